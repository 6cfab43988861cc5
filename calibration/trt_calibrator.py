"""TensorRT 10's implicit INT8 calibration: ``IInt8EntropyCalibrator2`` over the calibration images.

The primary INT8 path is the Q/DQ model from ``uflow calibrate int8`` (TensorRT 10 and 11 both build
it). This calibrator is the fallback for a TensorRT 10 device given a bundle without a Q/DQ model:
TensorRT runs the FP32 network on the same good images (same reader, same preprocessing as the
agent) and picks per-tensor scales itself. Deprecated in TensorRT 10.1, removed in 11.

The TensorRT subclass is created by :func:`make_entropy_calibrator` because its base class only
exists where TensorRT 10 is installed; this module imports without TensorRT or pycuda. The calibration
cache (TensorRT's own text format) is written beside the plans, keyed by ONNX sha256 and TensorRT
version, so a rebuild (a new GPU of the same fleet, a lost plan) skips the image pass.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from calibration.data import ImageSet, model_batches
from edge_agent.engine_cache import atomic_write_bytes

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
        atomic_write_bytes(self.cache_path, bytes(cache))
        log.info(
            "wrote the INT8 calibration cache",
            extra={"event": "trt_calibration_cache_written", "path": str(self.cache_path)},
        )


def make_entropy_calibrator(trt: ModuleType, cuda: ModuleType, feed: CalibrationFeed) -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` over ``feed`` (TensorRT 10 only; call with a CUDA context current)."""
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise RuntimeError(
            f"TensorRT {trt.__version__} has no INT8 calibrators (removed in 11.0); "
            "make a Q/DQ model with `uflow calibrate int8` instead"
        )

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # the binding requires the explicit base __init__
            self._device = cuda.mem_alloc(feed.nbytes)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = feed.next_batch()
            if batch is None:
                return None
            cuda.memcpy_htod(self._device, batch)
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            return feed.read_cache()

        def write_calibration_cache(self, cache: memoryview) -> None:
            feed.write_cache(cache)

        def release(self) -> None:
            """Free the device buffer now, while the CUDA context is still current."""
            self._device.free()

    return EntropyCalibrator()
