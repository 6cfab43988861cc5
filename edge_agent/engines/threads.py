"""How many ONNX Runtime threads the agent runs, and whether they spin: chosen for this machine and source.

The agent is a pipeline (edge_agent/inspection/pipeline.py): capture, inference, NFA and publish run in
their own threads at the same time, so inference must leave CPU for the other stages. ONNX Runtime's
own default (one intra-op thread per core, spinning while it waits for work) is right for a program that
only runs the model; in the agent the spinning threads take the cores the NFA and capture threads need.

``model.threads = 0`` (the default) means "choose" (``plan_threads``), from the cores this process may
run on (``os.sched_getaffinity``) and whether the source is live:

- 1 core: one intra-op thread; nothing to share.
- 2 or more cores: one intra-op thread per core, **not spinning**: when a frame is inferred the engine
  uses every core, and between frames (or while it waits for the next camera frame) its threads sleep,
  so the NFA, capture and publish threads get the cores back. Measured on 2 cores (docs/agent.md,
  "Threads"): spinning costs 2.5-3x the frame rate (engine alone and agent alike, on a machine with
  other runnable threads), and two non-spinning threads beat one by 1.3-1.9x on every source.
- inter-op threads: 1. The session runs its graph sequentially (``ORT_SEQUENTIAL``), so more inter-op
  threads would only be idle threads.
- no core pinning (``pin_cores`` is False): the engine on a core of its own caps it at that core while
  the other stages use little of theirs; see docs/agent.md for the measurement.

The source is part of the plan and of ``edge-agent doctor``'s row, but on 2 cores the measurements
give the same choice for a live source and a folder (spinning costs both). More than 2 cores could not be
measured; a thread per core without spinning there is the same reasoning, not a measurement.
Explicit settings win: ``model.threads > 0`` sets the intra-op threads, ``model.spinning``
= on/off sets spinning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

Spinning = Literal["auto", "on", "off"]

INTRA_SPIN_KEY = "session.intra_op.allow_spinning"
INTER_SPIN_KEY = "session.inter_op.allow_spinning"


@dataclass(frozen=True)
class ThreadPlan:
    """The ONNX Runtime threading of one engine, and why."""

    intra_op_threads: int
    inter_op_threads: int
    spinning: bool
    pin_cores: bool  # the engine and the other stages on their own cores (never chosen today: see the module)
    cores: int
    live: bool
    reason: str

    def session_config(self) -> dict[str, str]:
        """The ONNX Runtime session config entries this plan sets."""
        flag = "1" if self.spinning else "0"
        return {INTRA_SPIN_KEY: flag, INTER_SPIN_KEY: flag}

    def describe(self) -> str:
        """One line for logs and ``edge-agent doctor``."""
        return (
            f"{self.intra_op_threads} intra-op / {self.inter_op_threads} inter-op thread(s), spinning "
            f"{'on' if self.spinning else 'off'}, {'pinned' if self.pin_cores else 'no pinning'} "
            f"({self.cores} core(s), {'live' if self.live else 'file/folder'} source): {self.reason}"
        )


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def plan_threads(threads: int, spinning: Spinning, cores: int, live: bool) -> ThreadPlan:
    """The threading for ``model.threads`` / ``model.spinning`` on ``cores`` cores and a live or file source.

    ``threads`` 0 and ``spinning`` "auto" are chosen here; any other value is used as given.
    """
    if threads < 0:
        raise ValueError(f"model.threads must be 0 (choose) or a positive thread count, not {threads}")
    if cores < 1:
        raise ValueError(f"cores must be at least 1, not {cores}")
    reasons: list[str] = []
    if threads > 0:
        intra = threads
        reasons.append(f"model.threads = {threads} (set)")
    elif cores == 1:
        intra = 1
        reasons.append("one core: one intra-op thread")
    else:
        intra = cores
        reasons.append("one intra-op thread per core")
    if spinning != "auto":
        spin = spinning == "on"
        reasons.append(f"model.spinning = {spinning} (set)")
    elif intra == 1:
        spin = False  # a single intra-op thread is the caller's own thread: nothing to spin
        reasons.append("spinning off (one thread: nothing waits)")
    else:
        spin = False
        reasons.append(
            "spinning off: the capture, NFA and publish threads share these cores"
            + (" and the camera paces the frames" if live else "")
        )
    return ThreadPlan(
        intra_op_threads=intra,
        inter_op_threads=1,
        spinning=spin,
        pin_cores=False,
        cores=cores,
        live=live,
        reason="; ".join(reasons),
    )
