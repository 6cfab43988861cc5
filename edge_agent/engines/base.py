"""What every inference backend provides, and the checks all backends share.

The I/O contract (docs/design.md section 4): input ``image`` uint8 1xHxWx3 RGB at the model size; outputs
``anomaly_map`` float32 1xHxW and one m_s per scale, float32 1xH_sxW_s. Backends differ only in how
they run the graph; names, shapes and validation against the bundle live here so that ONNX Runtime
and TensorRT agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_agent.bundle import ANOMALY_MAP_NAME, Bundle, BundleError, Manifest


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and numpy dtype of one engine tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.name} {self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class EngineIO:
    """The tensors an engine for this bundle must have."""

    input: TensorSpec
    outputs: tuple[TensorSpec, ...]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class EngineOutput:
    """One frame's raw engine results, batch axis removed."""

    anomaly_map: np.ndarray  # float32 (H, W) at the model size
    scale_maps: tuple[np.ndarray, ...]  # float32 (H_s, W_s), m_s = mean over channels of z^2


class Engine(Protocol):
    """An inference backend bound to one bundle."""

    backend: str
    io: EngineIO

    def infer(self, image: np.ndarray) -> EngineOutput:
        """Run one uint8 HxWx3 RGB image at the model size."""
        ...

    def close(self) -> None:
        """Release native resources."""
        ...


def expected_io(manifest: Manifest) -> EngineIO:
    """The engine I/O the manifest promises."""
    spec = manifest.input
    image = TensorSpec(spec.name, (1, spec.height, spec.width, 3), "uint8")
    outputs = [TensorSpec(ANOMALY_MAP_NAME, (1, spec.height, spec.width), "float32")]
    outputs += [TensorSpec(s.name, (1, s.height, s.width), "float32") for s in manifest.scales]
    return EngineIO(image, tuple(outputs))


def check_io_matches(
    bundle: Bundle, actual_inputs: Sequence[TensorSpec], actual_outputs: Sequence[TensorSpec]
) -> EngineIO:
    """Compare a loaded model's tensors with the manifest; raise BundleError naming the first mismatch."""
    expected = expected_io(bundle.manifest)
    where = f"bundle {bundle.root}"
    if len(actual_inputs) != 1:
        names = [t.name for t in actual_inputs]
        raise BundleError(f"{where}: the model has inputs {names}, expected exactly one named {expected.input.name!r}")
    _check_tensor(where, "input", expected.input, actual_inputs[0])
    actual_by_name = {t.name: t for t in actual_outputs}
    for want in expected.outputs:
        got = actual_by_name.get(want.name)
        if got is None:
            raise BundleError(
                f"{where}: the model has no output {want.name!r} (it has {sorted(actual_by_name)}); "
                "model.json and model.onnx do not belong together"
            )
        _check_tensor(where, "output", want, got)
    return expected


def _check_tensor(where: str, role: str, want: TensorSpec, got: TensorSpec) -> None:
    if got.name != want.name:
        raise BundleError(f"{where}: {role} is named {got.name!r}, the manifest expects {want.name!r}")
    if got.dtype != want.dtype:
        raise BundleError(f"{where}: {role} {want.name!r} is {got.dtype}, expected {want.dtype}")
    if tuple(got.shape) != tuple(want.shape):
        raise BundleError(
            f"{where}: {role} {want.name!r} has shape {list(got.shape)}, the manifest says {list(want.shape)}"
        )


def check_frame(io: EngineIO, image: np.ndarray) -> np.ndarray:
    """Validate an input image and add the batch axis; raise ValueError saying what is wrong."""
    _, height, width, channels = io.input.shape
    if image.dtype != np.uint8:
        raise ValueError(f"engine input must be uint8, got {image.dtype}")
    if image.shape != (height, width, channels):
        raise ValueError(f"engine input must be {height}x{width}x{channels} RGB, got shape {image.shape}")
    return np.ascontiguousarray(image)[None]


def split_outputs(io: EngineIO, arrays: Sequence[np.ndarray]) -> EngineOutput:
    """Turn output arrays (in ``io.outputs`` order, batch axis first) into an EngineOutput."""
    if len(arrays) != len(io.outputs):
        raise ValueError(f"engine returned {len(arrays)} outputs, expected {len(io.outputs)}")
    squeezed = [
        np.asarray(a, dtype=np.float32).reshape(spec.shape[1:]) for a, spec in zip(arrays, io.outputs, strict=True)
    ]
    return EngineOutput(anomaly_map=squeezed[0], scale_maps=tuple(squeezed[1:]))
