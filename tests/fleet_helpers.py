"""Signed bundles, a fleet directory and a real HTTP server on loopback, for update tests.

Bundles are contract bundles (tests/contract_bundle.py: a real ONNX graph run by ONNX Runtime) with
self-test images added the way ``uflow export`` ships them: files under ``selftest/`` listed in both
``files`` and ``self_test`` of model.json, then signed.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from contract_bundle import build_contract_bundle, defect_frame, good_frame

from edge_agent.bundle import MODEL_NAME, ScaleSpec, file_hashes, read_manifest, write_manifest
from edge_agent.fleet.signing import sign_bundle

SIZE = 64


def make_bundle(
    root: Path,
    version: str,
    key: Path | None,
    selftest: str = "good",
    io_mismatch: bool = False,
    seed: int = 0,
) -> Path:
    """A bundle directory; ``selftest`` is "good", "defect" or "none"; ``io_mismatch`` declares a wrong shape."""
    build_contract_bundle(root, height=SIZE, width=SIZE, name="tile", version=version)
    rng = np.random.default_rng(seed)
    images = []
    if selftest != "none":
        (root / "selftest").mkdir()
        for i in range(2):
            rgb = good_frame(rng, 96, 96) if selftest == "good" else defect_frame(rng, 96, 96, box=(30, 30, 30, 30))
            rel = f"selftest/good_{i}.png"
            cv2.imwrite(str(root / rel), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            images.append(rel)
    manifest = read_manifest(root)
    scales = manifest.scales
    if io_mismatch:
        # model.json promises a first scale one row taller than model.onnx produces.
        first = scales[0]
        scales = (ScaleSpec(**{**first.model_dump(), "height": first.height + 1}), *scales[1:])
    manifest = manifest.model_copy(
        update={"files": file_hashes(root, [MODEL_NAME, *images]), "self_test": tuple(images), "scales": scales}
    )
    write_manifest(root, manifest)
    if key is not None:
        sign_bundle(root, key)
    return root


class FleetServer:
    """http.server serving a fleet directory on 127.0.0.1 (a thread; every request logged to a list)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                requests.append(self.path)

        handler = functools.partial(Handler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FleetServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def serving(directory: Path) -> Iterator[FleetServer]:
    server = FleetServer(directory).start()
    try:
        yield server
    finally:
        server.stop()
