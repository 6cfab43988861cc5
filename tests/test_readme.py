"""The README's set-up commands are what CI runs and name commands that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    blocks = _bash_blocks((REPO / "README.md").read_text())
    test_command = next(b.strip() for b in blocks if b.strip().endswith("-m pytest"))
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_commands_exist() -> None:
    from edge_agent.cli import COMMANDS

    text = (REPO / "README.md").read_text()
    used = set(re.findall(r"edge-agent ([a-z][a-z-]+)", text))
    assert used <= set(COMMANDS), f"README names edge-agent commands that do not exist: {used - set(COMMANDS)}"


def test_readme_links_resolve() -> None:
    text = (REPO / "README.md").read_text()
    missing = [link for link in re.findall(r"\]\(([^)#:]+)\)", text) if not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
