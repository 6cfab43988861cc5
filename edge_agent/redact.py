"""Credentials out of what the agent reports: a plumbing helper for every layer that names a source.

Sources, logs, messages, /healthz and doctor all call ``redact_uri`` before a URI leaves the process.
"""

from __future__ import annotations

import re

# user[:password]@ after a scheme, and GStreamer/RTSP credential properties (user-id=..., user-pw=...).
_URI_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@")
_PROPERTY_CREDENTIALS = re.compile(r"\b(user-id|user-pw|password|passwd|user)=(\"[^\"]*\"|'[^']*'|\S+)", re.I)


def redact_uri(text: str) -> str:
    """``text`` with credentials in URIs and pipeline properties replaced by ``***``.

    For everything that reports a source (messages, spool, stats, /healthz, /preview.json, doctor,
    logs): ``rtsp://user:pass@cam/stream`` becomes ``rtsp://***@cam/stream``.
    """
    text = _URI_CREDENTIALS.sub(r"\1***@", text)
    return _PROPERTY_CREDENTIALS.sub(r"\1=***", text)
