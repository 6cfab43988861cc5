"""The calibration image feed of TensorRT 10's implicit INT8 calibration (``IInt8EntropyCalibrator2``).

No longer used to build plans (issue 12): that calibrator lets TensorRT quantize the backbone
(docs/precision.md: -12.6 pixel-AUROC points for the stem alone), it is deprecated since TensorRT 10.1
and removed in 11. INT8 is built only from the bundle's Q/DQ model (``uflow calibrate int8``, backbone
FP32) as a strongly typed network, and ``edge-agent build-engine --calibration-data`` is ignored with a
warning. The TensorRT subclass that used this feed is gone; the pure feed (uint8 batches in engine
input format, a calibration table cache keyed by ONNX sha256 and TensorRT version) stays only for the
tests that still exercise it, and can be removed with them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from calibration.data import ImageSet, model_batches
from edge_agent.fileio import atomic_write

log = logging.getLogger(__name__)


def calibration_cache_path(cache_dir: Path, onnx_sha256: str, tensorrt_version: str) -> Path:
    """Where the calibration table of this model and TensorRT version lives."""
    return Path(cache_dir) / f"{onnx_sha256[:12]}-int8-calibration-trt{tensorrt_version}.cache"


class CalibrationFeed:
    """The pure half of the calibrator: batches in engine input format, and the cache file.

    TensorRT calls ``get_batch`` until it returns None; each batch is one contiguous uint8
    1xHxWx3 image, as the engine takes it.
    """

    def __init__(self, images: ImageSet, height: int, width: int, cache_path: Path) -> None:
        self.shape = (1, height, width, 3)
        self.nbytes = int(np.prod(self.shape))
        self.cache_path = Path(cache_path)
        self._batches = model_batches(images, height, width)
        self.served = 0

    def next_batch(self) -> np.ndarray | None:
        batch = next(self._batches, None)
        if batch is None:
            log.info("calibration images done", extra={"event": "trt_calibration_done", "images": self.served})
            return None
        self.served += 1
        return np.ascontiguousarray(batch, dtype=np.uint8)

    def read_cache(self) -> bytes | None:
        if self.cache_path.is_file():
            log.info(
                "using the INT8 calibration cache",
                extra={"event": "trt_calibration_cache", "path": str(self.cache_path)},
            )
            return self.cache_path.read_bytes()
        return None

    def write_cache(self, cache: bytes | memoryview) -> None:
        atomic_write(self.cache_path, bytes(cache))
        log.info(
            "wrote the INT8 calibration cache",
            extra={"event": "trt_calibration_cache_written", "path": str(self.cache_path)},
        )
