"""The shape every long-lived part of the agent follows: ``start``, ``tick``, ``stop``, ``figures``, ``problems``.

``Agent.serve`` (edge_agent/service/agent.py) starts each part before the frames flow, ticks it every
supervisor round, stops it after the frames stopped, and reads its ``figures`` and ``problems`` into the one
``AgentSnapshot`` per round (edge_agent/service/agent_snapshot.py). ``PartInputs`` (the ``[parts]`` inputs),
``LineLoop`` and each of the loop's components (edge_agent/service/loop.py) are ``AgentPart`` s; the loop's
components are pipeline ``FrameObserver`` s too.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

FiguresT_co = TypeVar("FiguresT_co", covariant=True)


class AgentPart(Protocol[FiguresT_co]):
    """One part of the running agent (see the module docstring)."""

    def start(self) -> None:
        """Before the frames flow: threads, devices, models. Raises only for a configuration that cannot run."""
        ...

    def tick(self) -> None:
        """Every supervisor round (about twice a second): time-based work. Must return quickly."""
        ...

    def stop(self) -> None:
        """After the frames stopped: finish pending work (bounded in time) and release what ``start`` took."""
        ...

    def figures(self) -> FiguresT_co:
        """Its counters for the agent's snapshot (the ``stats`` message's fields; None where it is off)."""
        ...

    def problems(self) -> list[str]:
        """Its ``/healthz`` sentences, one per problem; empty when all is well."""
        ...
