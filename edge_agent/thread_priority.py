"""Thread priority: background work (the shadow model, writing kept frames) yields the CPU to the live stages.

Plumbing shared by inspection/shadow.py and the service's keep and record threads.
"""

from __future__ import annotations

import contextlib
import os
import threading


def lower_thread_priority(nice: int, idle: bool = False) -> int:
    """Give the calling thread (only) the nice value ``nice``; returns its kernel thread id.

    On Linux a thread is a task with its own nice value, so background work (the shadow model, writing
    kept frames) yields the CPU to the live stages. With ``idle`` the thread also gets the SCHED_IDLE
    policy: it runs only on a CPU nothing else wants, and any live thread that wakes up preempts it at once
    (a niced thread still gets time slices, which stalls ONNX Runtime's parallel operators waiting for the
    one worker thread it delayed). Elsewhere this does nothing.
    """
    native_id = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, native_id, nice)
    if idle:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(native_id, os.SCHED_IDLE, os.sched_param(0))
    return native_id
