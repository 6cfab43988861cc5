"""Inference backends behind one protocol (see base.Engine)."""

from edge_agent.engines.base import Engine, EngineIO, EngineOutput, TensorSpec

__all__ = ["Engine", "EngineIO", "EngineOutput", "TensorSpec"]
