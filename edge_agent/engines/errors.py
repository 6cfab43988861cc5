"""Why an inference backend cannot run here: the errors every engine module raises.

They live apart from ``edge_agent.engines`` (which re-exports them) so that the backends can raise them
without importing the package that imports the backends.
"""

from __future__ import annotations

__all__ = ["EngineUnavailable", "GpuUnreachable", "TensorRTTooOld"]


class EngineUnavailable(RuntimeError):
    """The requested backend cannot run on this device; the message says why."""


class GpuUnreachable(EngineUnavailable):
    """TensorRT and a CUDA binding are installed but no GPU can be opened (no driver, no device node, or a
    sandbox hiding it, e.g. a missing Jetson drop-in); ``build-engine`` exits with its own status for it."""


class TensorRTTooOld(EngineUnavailable):
    """The installed TensorRT is older than 10; the message names the JetPack (or wheel) to install."""
