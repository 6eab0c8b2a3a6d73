"""dvc.yaml tells the truth: each stage's code deps are exactly the project files its command
imports, so editing one reruns the stage and nothing else.

The files come from the import graph: the module-level imports of ``pipeline/cli.py`` plus the
imports inside the stage's command function there, then everything those modules import
(function-level imports included, a safe superset), with the package ``__init__`` files Python
runs on the way. A second test runs each command and checks that every project module it
really loads is in that set, so the graph cannot miss what Python does.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml
from probe import cli_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ddpm", "pipeline")
CLI = ROOT / "pipeline" / "cli.py"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_path(name: str) -> Path | None:
    """The project file of module ``name`` (a package's ``__init__.py``), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_names(node: ast.AST) -> set[str]:
    """Every module an import statement anywhere under ``node`` loads (absolute imports)."""
    names: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            names |= {alias.name for alias in child.names}
        elif isinstance(child, ast.ImportFrom):
            assert child.level == 0, "relative imports would need resolving; the project has none"
            names.add(child.module)
            names |= {f"{child.module}.{alias.name}" for alias in child.names}  # submodules
    return {n for n in names if module_path(n) is not None}


@cache
def closure(start: frozenset[str]) -> frozenset[str]:
    """The project modules reachable from ``start`` through imports, packages included."""
    seen: set[str] = set()
    todo = [parent for name in start for parent in with_parents(name)]
    while todo:
        name = todo.pop()
        path = module_path(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for imported in imported_names(ast.parse(path.read_text())):
            todo += with_parents(imported)
    return frozenset(seen)


def command_function(tree: ast.Module, command: str) -> ast.FunctionDef:
    """The function that ``@app.command()`` registers under ``command``."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.replace("_", "-") == command:
            return node
    raise AssertionError(f"pipeline/cli.py has no command {command!r}")


def stage_modules(stage: str) -> frozenset[str]:
    """The project modules the stage's command loads: cli.py's own imports, the command's."""
    command = STAGES[stage]["cmd"].split()
    assert command[:3] == ["python", "-m", "pipeline.cli"], command
    tree = ast.parse(CLI.read_text())
    top_level = ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)])
    start = imported_names(top_level) | imported_names(command_function(tree, command[3]))
    return closure(frozenset(start)) | {"pipeline", "pipeline.cli"}  # cli.py itself: just read


def stage_files(stage: str) -> set[str]:
    return {str(module_path(m).relative_to(ROOT)) for m in stage_modules(stage)}


def code_deps(stage: str) -> set[str]:
    deps = STAGES[stage].get("deps", [])
    return {d for d in deps if d.split("/")[0] in PACKAGES}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_depends_on_exactly_the_project_files_its_command_imports(stage):
    needed, listed = stage_files(stage), code_deps(stage)
    assert not (needed - listed), f"{stage}: add to its deps in dvc.yaml: {sorted(needed - listed)}"
    assert not (listed - needed), f"{stage}: remove from its deps: {sorted(listed - needed)}"


def test_the_graph_sees_a_lazy_import_inside_a_command_and_a_package_init():
    """Two ways a dep hides: an import inside a function, and a package's __init__ file."""
    assert "pipeline.train" in stage_modules("train")
    assert "pipeline.train" not in stage_modules("sample")
    assert {"ddpm", "ddpm.data", "ddpm.data.prepared"} <= stage_modules("train")
    assert "ddpm.data.cifar10" not in stage_modules("train")  # data sets' readers: prepare only


def test_training_and_sampling_are_siblings_neither_imports_the_other():
    for a, b in [("ddpm.train", "ddpm.generation"), ("pipeline.train", "pipeline.sample")]:
        assert b not in closure(frozenset({a})) and a not in closure(frozenset({b})), (a, b)
    assert "ddpm.train" not in stage_modules("evaluate")


def loaded_modules(stage: str, tmp_path: Path) -> set[str]:
    """The project modules Python really loads for the stage's command, up to reading params.

    The command stops at the missing params file, after its stage module and everything that
    imports at module level have loaded.
    """
    text, names = cli_imports([stage, "--params", str(tmp_path / "missing.yaml")], code=2)
    assert "no such params file" in text
    return {n for n in names if n.split(".")[0] in PACKAGES} | {"pipeline.cli"}


@pytest.mark.parametrize("stage", ["download", "train", "evaluate"])
def test_every_module_a_stage_loads_is_in_its_import_graph(stage, tmp_path):
    loaded = loaded_modules(stage, tmp_path)
    assert f"pipeline.{stage}" in loaded
    assert loaded <= stage_modules(stage), sorted(loaded - stage_modules(stage))


def test_dvc_yaml_passes_dvcs_own_schema():
    """DVC refuses a dvc.yaml its schema rejects (a stage plot's y must be one column; a
    line per column is a top-level plot), and then no stage runs at all."""
    import voluptuous
    from dvc.schema import MULTI_STAGE_SCHEMA

    voluptuous.Schema(MULTI_STAGE_SCHEMA)(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
