"""The layout's rules, checked: no import cycle between the project's modules (imports inside
functions count), every command answers --help without starting anything, and no project file
cites a document outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click

from configs.home import REPO
from flows.cli import cli

PACKAGES = ("configs", "evaluation", "flows", "serving", "tasks")


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported(path: Path, me: str, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in it (relative imports resolved)."""
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for imported in names:
            name = imported
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    known = project_modules()
    graph = {name: imported(path, name, known) for name, path in known.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


def test_every_command_answers_help_and_starts_nothing():
    """In a fresh interpreter: every --help answers with its usage, and neither Prefect, MLflow
    nor vLLM was even imported (so no flow ran and no server started)."""
    paths = command_paths(cli)
    assert ("drift",) in paths and ("rollout", "run") in paths and ("bench", "gateway") in paths
    script = f"""
import sys
from click.testing import CliRunner
from flows.cli import cli
for path in {paths!r}:
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="slipway")
    assert result.exit_code == 0, (path, result.output)
    assert result.output.startswith("Usage: slipway " + " ".join(path)), (path, result.output)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "mlflow", "vllm", "torch")))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_project_file_cites_a_document_outside_the_repository():
    cited = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        skipped = parts[0] in (".git", ".slipway") or "__pycache__" in parts
        if not path.is_file() or skipped or path == Path(__file__):  # this file names them
            continue
        if path.suffix in (".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".json", ".in"):
            text = path.read_text(errors="replace")
            if "FIELD-NOTES" in text or "../shared" in text:
                cited.append(str(path.relative_to(REPO)))
    assert cited == [], cited
