"""ONNX Runtime backend: the embedded default wherever there is no GPU."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent.bundle import Bundle, BundleError
from edge_agent.engines.base import (
    EngineIO,
    EngineOutput,
    TensorSpec,
    check_frame,
    check_io_matches,
    split_outputs,
)
from edge_agent.engines.threads import Spinning, ThreadPlan, available_cores, plan_threads

_ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}


def _spec(arg: Any) -> TensorSpec:  # onnxruntime.NodeArg (no type stubs)
    shape = tuple(int(d) if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_DTYPES.get(arg.type, arg.type))


class OnnxRuntimeEngine:
    """Runs a bundle's ONNX model with ONNX Runtime on the CPU."""

    backend = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "fp32",
        threads: int = 0,
        spinning: Spinning = "auto",
        live: bool = False,
    ) -> None:
        """Load the bundle's model; ``threads`` 0 and ``spinning`` "auto" are chosen (engines/threads.py)."""
        import onnxruntime as ort

        path = bundle.model_path(precision)
        self.threads: ThreadPlan = plan_threads(threads, spinning, available_cores(), live)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # the plan's inter-op threads assume it
        options.intra_op_num_threads = self.threads.intra_op_threads
        options.inter_op_num_threads = self.threads.inter_op_threads
        for key, value in self.threads.session_config().items():
            options.add_session_config_entry(key, value)
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for malformed graphs
            raise BundleError(f"bundle {bundle.root}: ONNX Runtime cannot load {path.name}: {exc}") from exc
        self.precision = precision
        self.io: EngineIO = check_io_matches(
            bundle,
            [_spec(a) for a in self._session.get_inputs()],
            [_spec(a) for a in self._session.get_outputs()],
        )

    def infer(self, image: np.ndarray) -> EngineOutput:
        """Run one uint8 HxWx3 RGB image at the model size."""
        batch = check_frame(self.io, image)
        arrays = self._session.run(list(self.io.output_names), {self.io.input.name: batch})
        return split_outputs(self.io, arrays)

    def close(self) -> None:
        self._session = None
