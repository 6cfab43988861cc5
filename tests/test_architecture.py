"""The architecture, checked statically: an acyclic import graph, a device package that never reaches
into training, and documentation that names only files that exist.

Imports are read with ``ast`` from the source (nothing is imported), at every level: module top,
``if TYPE_CHECKING:`` blocks and function bodies alike, because a function-local import is still a
dependency (it only hides a cycle until the function runs). docs/design.md says where new code goes.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_agent", "training", "calibration")
# Device-side code must run where the `train` extra is not installed.
FORBIDDEN_ON_DEVICE = ("training", "torch", "torchvision", "timm", "FrEIA")


@cache
def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every absolute name an ``import`` or ``from ... import`` in the file may refer to, with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            yield source, node.lineno
            for alias in node.names:  # `from pkg import submodule` depends on the submodule
                yield f"{source}.{alias.name}", node.lineno


def project_dependencies(module: str) -> dict[str, int]:
    """The project modules ``module`` imports -> the first line that does."""
    known = project_modules()
    found: dict[str, int] = {}
    for name, line in imported_names(module, known[module]):
        while name and name not in known:  # `pkg.mod.attr` -> `pkg.mod`
            name = name.rpartition(".")[0]
        if name and name != module:
            found.setdefault(name, line)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_strongly_connected_finds_a_cycle_and_only_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_function_local_and_type_checking_imports_are_seen(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n"
        "def f():\n    from . import sibling\n    import pkg.b\n"
    )
    names = {name for name, _ in imported_names("pkg.mod", source)}
    assert {"pkg.a", "pkg.sibling", "pkg.b"} <= names


def test_no_import_cycle_between_project_modules() -> None:
    graph = {module: set(project_dependencies(module)) for module in project_modules()}
    cycles = strongly_connected(graph)
    described = [
        " <-> ".join(cycle)
        + ": "
        + "; ".join(
            f"{a} imports {b} (line {project_dependencies(a)[b]})" for a in cycle for b in sorted(graph[a] & set(cycle))
        )
        for cycle in cycles
    ]
    assert not cycles, "import cycles (move the shared part down into a module both can import):\n" + "\n".join(
        described
    )


def test_the_device_package_never_imports_training_or_torch() -> None:
    offenders = []
    for module, path in project_modules().items():
        if not module.startswith("edge_agent"):
            continue
        for name, line in imported_names(module, path):
            if name.split(".")[0] in FORBIDDEN_ON_DEVICE:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offenders, "edge_agent must run without the train extra:\n" + "\n".join(sorted(set(offenders)))


def test_scoring_and_the_nfa_do_not_depend_on_the_engines() -> None:
    # Scoring reads plain arrays (scoring.ModelMaps, the bundle's contract); the NFA imports nothing of ours.
    assert not [m for m in project_dependencies("edge_agent.inspection.scoring") if m.startswith("edge_agent.engines")]
    assert project_dependencies("edge_agent.inspection.nfa") == {}


# What runs on every frame (docs/design.md section 1) and the service code that watches it from outside.
FRAME_PATH = (
    "edge_agent.inspection.frame_source",
    "edge_agent.inspection.preprocess",
    "edge_agent.engines",
    "edge_agent.inspection.scoring",
    "edge_agent.inspection.nfa",
    "edge_agent.inspection.pipeline",
    "edge_agent.publish.mqtt",
    "edge_agent.publish.session",
    "edge_agent.publish.outbox",
    "edge_agent.publish.spool",
    "edge_agent.inspection.loaded_model",
)
SERVICE = (
    "edge_agent.service.agent",
    "edge_agent.publish.commands",
    "edge_agent.service.health",
    "edge_agent.service.http_server",
    "edge_agent.service.metrics",
    "edge_agent.service.preview",
    "edge_agent.cli.run",
    "edge_agent.fleet.update",
    "edge_agent.fleet.index",
)


def reachable(start: str) -> set[str]:
    """Every project module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for name in project_dependencies(todo.pop()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_the_frame_path_never_imports_service_code() -> None:
    # Service code reads the running parts through narrow views; the reverse would make the hot path
    # depend on HTTP, Prometheus, commands or the updater (docs/design.md section 8).
    known = project_modules()
    assert set(FRAME_PATH + SERVICE) <= set(known), "a module was moved: update FRAME_PATH / SERVICE here"
    frame_path = [m for m in known if m.startswith(FRAME_PATH)]
    offenders = {m: sorted(reachable(m) & set(SERVICE)) for m in frame_path}
    assert not {m: s for m, s in offenders.items() if s}


# The device package's floors (docs/design.md section 1), lowest first: a module imports only from its own
# floor or lower ones, so the tree reads bottom-up and no folder reaches up into the one that uses it.
FLOORS = (
    # the contract (bundle, config, messages) and the plumbing every layer may use
    (
        *("config", "config_plc", "config_recipes", "config_files", "fileio", "logs", "systemd", "exit_codes"),
        *("bundle", "promise", "messages", "redact", "thread_priority"),
    ),
    # then the frame's own order: the model, the stages, what leaves the agent, and what reads its output
    ("engines",),
    ("inspection",),
    ("publish",),
    ("relay",),
    ("fleet", "plc"),
    ("service",),
    ("demo",),  # the whole product on one machine: its agent and relay run as they do in service/ and relay/
    ("cli",),
)


def floor_of(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else ""
    return next(i for i, names in enumerate(FLOORS) if part in names)


def test_the_frame_path_never_imports_its_last_stage_or_the_service() -> None:
    # inspection/ hands results to a pipeline.Publisher and speaks edge_agent.messages (the contract floor):
    # the output folder and the service code stay swappable and out of the hot path's imports.
    offenders = {
        m: sorted(d for d in project_dependencies(m) if d.startswith(("edge_agent.publish", "edge_agent.service")))
        for m in project_modules()
        if m.startswith("edge_agent.inspection")
    }
    assert not {m: d for m, d in offenders.items() if d}


def test_the_device_packages_folders_import_only_downwards() -> None:
    known = [m for m in project_modules() if m.startswith("edge_agent.") and m.count(".") >= 1]
    unplaced = [m for m in known if not any(m.split(".")[1] in names for names in FLOORS)]
    assert not unplaced, f"a new top-level module or folder: give it a floor in FLOORS: {unplaced}"
    upward = [
        f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
        for m in known
        for d in project_dependencies(m)
        if d.startswith("edge_agent.") and d.count(".") >= 1 and floor_of(d) > floor_of(m)
    ]
    assert not upward, "imports that run up the floors:\n" + "\n".join(upward)


# -- files the documentation names ------------------------------------------------------------------

TOP_FOLDERS = ("docs", "edge_agent", "training", "calibration", "tests", "bench", "systemd")
EXTENSIONS = ("md", "py", "json", "toml", "txt", "service", "sh", "yaml", "yml", "html")
# A relative path into the repository (not part of a longer path or URL, e.g. another project's docs/).
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP_FOLDERS)})/[\w./-]*\w\.(?:{'|'.join(EXTENSIONS)}))\b")
TOP_LEVEL_DOC = re.compile(r"(?<![\w./-])([A-Z][A-Z_]*\.md)\b")  # README.md and the like at the top
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def documented_paths(text: str) -> Iterator[str]:
    """Repository-relative file paths named in ``text``."""
    for pattern in (REPO_PATH, TOP_LEVEL_DOC):
        for match in pattern.finditer(text):
            yield match.group(1)


def test_documented_paths_are_found(tmp_path: Path) -> None:
    name = "MADE_UP"  # put together at run time: this file's own text is scanned too
    text = (
        f"see docs/{name}.md, edge_agent/inspection/nfa.py and {name}.md; not https://x.org/docs/a.md nor x/docs/b.md"
    )
    assert list(documented_paths(text)) == [f"docs/{name}.md", "edge_agent/inspection/nfa.py", f"{name}.md"]


def test_every_file_a_docstring_or_doc_names_exists() -> None:
    missing = []
    sources = [p for folder in (*PACKAGES, "tests", "bench") for p in sorted((ROOT / folder).rglob("*.py"))]
    configs = [p for p in sorted((ROOT / "systemd").rglob("*")) if p.is_file()]  # units and example configs
    for path in sources + configs:  # docstrings and comments alike: the whole text
        for name in documented_paths(path.read_text(encoding="utf-8", errors="replace")):
            if not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)} names {name}")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for name in documented_paths(text):
            if not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)} names {name}")
        for match in MARKDOWN_LINK.finditer(text):
            target = match.group(1)
            if "://" not in target and not target.startswith("mailto:") and not (path.parent / target).exists():
                missing.append(f"{path.relative_to(ROOT)} links to {target}")
    assert not missing, "files named but not in the repository:\n" + "\n".join(missing)


# A bare module name (``pipeline.py``, not part of a path): written for a reader who knows the folder, so it
# must at least be the name of one of the project's files (a renamed module leaves such names behind).
BARE_MODULE = re.compile(r"(?<![\w./-])([A-Za-z_]\w*\.py)\b")


def bare_module_names(text: str) -> Iterator[str]:
    """File names ending in .py named in ``text`` without a folder."""
    for match in BARE_MODULE.finditer(text):
        yield match.group(1)


def test_bare_module_names_are_found() -> None:
    text = "the source (sources.py), its worker (driver_worker.py) and edge_agent/inspection/nfa.py"
    assert list(bare_module_names(text)) == ["sources.py", "driver_worker.py"]


def test_every_bare_module_name_in_a_docstring_or_doc_is_a_project_file() -> None:
    # tests/ are left out: they write files with made-up names (probe.py, sitecustomize.py) on purpose.
    project = [p for folder in (*PACKAGES, "tests", "bench") for p in (ROOT / folder).rglob("*.py")]
    names = {p.name for p in project} | {p.name for p in ROOT.glob("*.py")}
    sources = [p for folder in (*PACKAGES, "bench") for p in sorted((ROOT / folder).rglob("*.py"))]
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = [
        f"{path.relative_to(ROOT)} names {name}"
        for path in sources + docs
        for name in bare_module_names(path.read_text(encoding="utf-8"))
        if name not in names
    ]
    assert not missing, "modules named but not in the project (renamed? give the new name):\n" + "\n".join(missing)


# -- private attributes stay in their file ------------------------------------------------------------


def _self_attributes(node: ast.AST) -> Iterator[tuple[str, int, bool]]:
    """``(name, line, assigned)`` for every ``self.<name>`` in ``node``."""
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == "self":
            yield child.attr, child.lineno, isinstance(child.ctx, ast.Store)


def _private_members(cls: ast.ClassDef) -> set[str]:
    """The ``_name`` methods and ``self._name`` attributes a class defines (dunders are not private)."""
    methods = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assigned = {name for name, _, stored in _self_attributes(cls) if stored}
    return {n for n in methods | assigned if n.startswith("_") and not n.endswith("__")}


def _defining_class(module: str, name: str, known: dict[str, Path]) -> tuple[str, ast.ClassDef] | None:
    """The module that defines class ``name`` and its AST, following re-exports (``from x import name``)."""
    for _ in range(5):
        tree = ast.parse(known[module].read_text(encoding="utf-8"))
        cls = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name), None)
        if cls is not None:
            return module, cls
        origin = next(
            (
                node.module
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names)
            ),
            None,
        )
        if origin not in known:
            return None
        module = origin
    return None


def private_reaches(module: str, path: Path) -> Iterator[str]:
    """Uses of a base class's private members by a subclass written in another module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    imported = {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    known = project_modules()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        own = _private_members(cls)
        for base in cls.bases:
            source = imported.get(base.id) if isinstance(base, ast.Name) else None
            if source not in known or source == module:
                continue
            assert isinstance(base, ast.Name)
            found = _defining_class(source, base.id, known)
            if found is None:
                continue  # not a class of the project (or an alias that cannot be followed)
            source, base_cls = found
            theirs = _private_members(base_cls) - own
            for name, line, _ in _self_attributes(cls):
                if name in theirs:
                    yield f"{path.name}:{line} {cls.name} uses {source}.{base.id}.{name}"


def test_private_reaches_are_found(tmp_path: Path) -> None:
    sub = tmp_path / "sub.py"
    sub.write_text(
        "from edge_agent.publish.session import MqttSession\n"
        "class P(MqttSession):\n    def f(self):\n        self._own = 1\n        return self._client_lock, self._own\n"
    )
    found = list(private_reaches("sub", sub))
    assert len(found) == 1 and "MqttSession._client_lock" in found[0]


def test_a_subclass_in_another_file_uses_only_its_bases_public_api() -> None:
    # A lock rule such as publish/session.py's can only be checked by reading one file if no other file
    # touches that class's private state (docs/design.md, "the MQTT session").
    found = [r for m, p in project_modules().items() for r in private_reaches(m, p)]
    assert not found, "use or add a public method instead:\n" + "\n".join(found)
