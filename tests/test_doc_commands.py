"""Commands as docs/operations.md writes them (issue 21): options after the action, --set everywhere, train hints.

Real processes of ``edge-agent`` and ``uflow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_harness import REPO, write_toml


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_review_export_takes_the_config_after_the_action(tmp_path: Path) -> None:
    training = tmp_path / "training"
    (training / "good").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(training / "good" / f"g{i}.png"), np.full((32, 32, 3), 60 * i, np.uint8))
    config = write_toml(tmp_path / "agent.toml", {"state_dir": str(tmp_path / "state"),
                        "keep": {"training_dir": str(training)}})  # fmt: skip
    out = tmp_path / "dataset"
    result = _run("edge_agent.cli", "review", "export", str(out), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (out / "split.json").is_file()
    assert f"train with: uflow train --data {out / 'split.json'} --out runs/dataset" in result.stdout
    listed = _run("edge_agent.cli", "review", "list", "--config", str(config), "--set", "keep.dir=" + str(tmp_path))
    assert listed.returncode == 0, listed.stderr


def test_doctor_takes_set_like_record_and_review(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "agent.toml", {"state_dir": str(tmp_path / "state")})
    result = _run("edge_agent.cli", "doctor", "--config", str(config), "--set", "device_id=cam-doc", "--json")
    assert "unrecognized arguments" not in result.stderr and result.returncode in (0, 1), result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert "device_id=cam-doc" in rows["config"]["detail"]
    bad = _run("edge_agent.cli", "doctor", "--set", "nonsense")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_a_failed_training_leaves_no_run_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    data = tmp_path / "good"
    data.mkdir()
    for i in range(4):
        cv2.imwrite(str(data / f"g{i}.png"), np.full((64, 64, 3), 100 + i, np.uint8))
    (data / "broken.png").write_bytes(b"not a png at all")  # read after config.json is written
    # (--square: the input size is not taken from the images, so nothing reads them before the run folder)
    out = tmp_path / "runs" / "line1"
    result = _run("training.cli", "train", "--data", str(data), "--out", str(out), "--image-size", "64",
                  "--square", "--epochs", "1", "--random-weights", "--quiet", timeout=600)  # fmt: skip
    assert result.returncode != 0 and "broken.png" in result.stderr, result.stderr[-2000:]
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    # A run folder that already held something keeps it; only the failed run's files go.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _run("training.cli", "train", "--data", str(data), "--out", str(out), "--image-size", "64",
                  "--square", "--epochs", "1", "--random-weights", "--quiet", timeout=600)  # fmt: skip
    assert result.returncode != 0 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- every documented command parses

_PROGRAM = re.compile(r"^(?:sudo\s+(?:-u\s+\S+\s+)?)?(?:[A-Z_]+=\S+\s+)*(?:\S*/)?(edge-agent|uflow)\s+(.*)$")


def documented_commands() -> list[tuple[str, str, str]]:
    """(file, program, arguments) of every ``edge-agent``/``uflow`` line in the README's and docs' code blocks.

    Backslash continuations are joined, comments and shell chaining split off, and the docs' optional
    notation ``[--flag a|b]`` read as ``--flag a`` (the first choice), so each line is one real command.
    """
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", path.read_text(), flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                if re.search("[─│◄►┘]", line):  # a diagram, not a command
                    continue
                line = re.sub(r"^\$ ", "", re.sub(r"\s+#.*$", "", line).strip())
                line = re.sub(r"\[([^\[\]]*)\]", lambda m: re.sub(r"\|\S+", "", m.group(1)), line)
                for part in re.split(r"&&|\|\||;|\s\|\s", line):
                    match = _PROGRAM.match(part.strip())
                    if match:
                        found.append((path.name, match.group(1), match.group(2)))
    return found


def test_every_documented_command_parses_with_the_real_parser() -> None:
    # issue 21: `review export DIR --config ...` as operations.md wrote it was refused by the parser
    from edge_agent.cli import COMMANDS as AGENT_COMMANDS
    from edge_agent.cli import DESCRIPTION as AGENT_DESCRIPTION
    from edge_agent.cli.common import parse_command
    from training.cli import COMMANDS as UFLOW_COMMANDS
    from training.cli import DESCRIPTION as UFLOW_DESCRIPTION

    commands = documented_commands()
    assert len(commands) >= 20, "the extraction found the docs' commands"
    tables = {"edge-agent": (AGENT_DESCRIPTION, AGENT_COMMANDS), "uflow": (UFLOW_DESCRIPTION, UFLOW_COMMANDS)}
    refused = []
    for name, program, rest in commands:
        description, table = tables[program]
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                parse_command(program, description, table, shlex.split(rest))
        except SystemExit as exc:
            if exc.code not in (0, None):
                refused.append(f"{name}: {program} {rest}: {errors.getvalue().strip().splitlines()[-1]}")
    assert not refused, "documented commands the parser refuses:\n" + "\n".join(refused)


def test_the_runnable_documented_commands_run() -> None:
    # The ones that need no box, model or data: the config reference and every command's help.
    reference = _run("edge_agent.cli", "config", "--reference")
    assert reference.returncode == 0 and (REPO / "docs" / "configuration.md").read_text() == reference.stdout
    for program, module in (("edge-agent", "edge_agent.cli"), ("uflow", "training.cli")):
        used = {rest.split()[0] for _, prog, rest in documented_commands() if prog == program and rest.split()}
        for command in sorted(used):
            shown = _run(module, command, "--help")
            assert shown.returncode == 0 and "usage:" in shown.stdout, f"{program} {command} --help"
