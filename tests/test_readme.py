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


def test_the_install_lines_bring_the_tools_the_docs_use() -> None:
    # issue 21: the docs use mosquitto_pub/mosquitto_sub, which only Debian's mosquitto-clients installs
    docs = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    install_lines = [b for b in _bash_blocks((REPO / "README.md").read_text()) if "apt-get install" in b]
    assert len(install_lines) == 2, "the README has the demo's and the tests' set-up commands"
    tools = {"mosquitto_pub": "mosquitto-clients", "mosquitto_sub": "mosquitto-clients"}
    for tool, package in tools.items():
        if re.search(rf"\b{tool}\b", docs):
            for line in install_lines:
                assert re.search(rf"apt-get install -y [^&]*\b{package}\b", line), f"{tool} is used: install {package}"
