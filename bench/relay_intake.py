"""What one payload costs the relay's intake before it is refused or parsed (issue 24, finding 4).

Times the bounded parser's nesting-depth check (``messages._nesting_depth``: regex + ``bytes.translate`` +
numpy) against the per-bracket Python loop it replaced (kept here, as it was, for the comparison), and the whole
``parse_json_object`` / relay refusal, on payloads a flooding client would send. Prints a markdown table
(milliseconds per payload, best of ``--repeat``).

    .venv/bin/python bench/relay_intake.py
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.messages import PayloadError, _nesting_depth, parse_json_object  # noqa: E402
from edge_agent.relay.limits import MESSAGE_LIMITS, too_costly  # noqa: E402

_SPECIAL_RE = re.compile(rb'[\[\]{}"\\]')


def loop_depth(payload: bytes) -> int:
    """The depth check before issue 24: one Python iteration per bracket, quote or backslash."""
    depth = deepest = 0
    in_string = False
    escaped_until = -1
    for match in _SPECIAL_RE.finditer(payload):
        position = match.start()
        if position < escaped_until:
            continue
        char = payload[position]
        if in_string:
            if char == 0x5C:
                escaped_until = position + 2
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif char in (0x5D, 0x7D):
            depth -= 1
    return deepest


def brackets(size: int) -> bytes:
    head, tail = b'{"a":[', b"[]]}"
    return head + b"[]," * ((size - len(head) - len(tail)) // 3) + tail


def strings(size: int) -> bytes:
    return b'{"a":["' + b'\\"[{' * ((size - 12) // 4) + b'"]}'


def best_ms(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times) * 1000.0


def parse_or_refuse(payload: bytes, limit: int) -> None:
    with contextlib.suppress(PayloadError):
        parse_json_object(payload, limit)


def intake(payload: bytes, kind: str) -> None:
    """What the relay does before deciding: refuse unread when too costly, else the bounded parse."""
    if too_costly(kind, payload) is None:
        parse_or_refuse(payload, MESSAGE_LIMITS[kind])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    mib = 1 << 20
    cases = [
        ("1 MiB of brackets", brackets(mib)),
        ("1 MiB of escaped quotes in a string", strings(mib)),
        ("200 KiB of brackets", brackets(200 * 1024)),
        ("16 KiB of brackets", brackets(16 * 1024)),
        ("1100 levels deep", b'{"a":' * 1100 + b"1" + b"}" * 1100),
    ]
    print(
        "| payload | bytes | depth | old loop depth ms | depth check ms | parse_json_object (1 MiB limit) ms | "
        "relay intake, part topic ms | relay intake, inspection topic ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, payload in cases:
        assert loop_depth(payload) == _nesting_depth(payload), name
        old = best_ms(lambda p=payload: loop_depth(p), args.repeat)
        new = best_ms(lambda p=payload: _nesting_depth(p), args.repeat)
        whole = best_ms(lambda p=payload: parse_or_refuse(p, mib), args.repeat)
        part = best_ms(lambda p=payload: intake(p, "part"), args.repeat)
        frame = best_ms(lambda p=payload: intake(p, "inspection"), args.repeat)
        print(
            f"| {name} | {len(payload)} | {_nesting_depth(payload)} | {old:.2f} | {new:.2f} | {whole:.2f} | "
            f"{part:.3f} | {frame:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
