"""Run a Python subprocess in which torch (and the rest of the training stack) cannot be imported.

The device never has torch. ``torch_free_env`` returns an environment whose PYTHONPATH holds a
``sitecustomize.py`` that installs a meta-path finder raising ImportError for the blocked packages, so
any import of them, direct or indirect, fails exactly as on a device without them.
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCKED = ("torch", "torchvision", "timm", "FrEIA", "onnx")

_SITECUSTOMIZE = """
import importlib.abc
import sys

_BLOCKED = {blocked!r}


class _NoTrainingStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: this process imitates a device without it)")
        return None


sys.meta_path.insert(0, _NoTrainingStack())
"""


def torch_free_env(directory: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess that cannot import torch & co (sitecustomize written into ``directory``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=set(BLOCKED)))
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory), env.get("PYTHONPATH", "")) if p)
    return env
