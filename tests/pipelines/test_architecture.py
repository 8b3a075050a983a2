"""The shape of pipelines/, read from its source (AST): what the layout promises, checked.

- no import cycles between pipelines modules, counting imports inside functions (a cycle held together
  by function-level imports is still a cycle);
- one place calls `ray.init` and one sets MLflow's tracking URI (`pipelines.session`); no `MlflowClient()`
  relies on a process-global tracking URI;
- the stage contract is a leaf; no stage imports the orchestrator;
- every stage is a package with its config, run function, spec and command, and every stage's command
  is a `vitpose` subcommand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from paths import REPO_ROOT

ROOT = REPO_ROOT
PACKAGE = ROOT / "pipelines"
STAGES = ("shard", "detect", "pretrain", "finetune", "tune", "distill", "register", "serve")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def imported_modules(name: str) -> set[str]:
    """The pipelines modules `name` imports anywhere in its body (top level or inside functions)."""
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipelines.x import y` imports module pipelines.x.y when y is a module, else pipelines.x
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                       for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def calls(name: str, attribute: str) -> list[ast.Call]:
    """Calls `x.attribute(...)` or `attribute(...)` in module `name`."""
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == attribute:
                found.append(node)
    return found


def test_the_graph_covers_the_package():
    assert len(MODULES) > 40 and "pipelines.pipeline" in GRAPH["pipelines.plan"]
    # a function-level import counts: the run command imports the orchestrator inside `run()`
    assert "pipelines.pipeline" in GRAPH["pipelines.commands.run"]


def test_no_import_cycles_counting_function_level_imports():
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("attribute, owner", [("init", "pipelines.session"),
                                              ("set_tracking_uri", "pipelines.session")])
def test_one_place_connects_to_ray_and_one_sets_the_tracking_uri(attribute, owner):
    def is_target(call: ast.Call) -> bool:
        func = call.func
        base = getattr(func, "value", None)
        if attribute == "init":  # ray.init only, not every `init`
            return isinstance(func, ast.Attribute) and getattr(base, "id", None) == "ray"
        return True

    places = {name: len([c for c in calls(name, attribute) if is_target(c)]) for name in MODULES}
    assert {name: n for name, n in places.items() if n} == {owner: 1}


def test_no_mlflow_client_relies_on_the_global_tracking_uri():
    bare = [f"{name}:{call.lineno}" for name in MODULES for call in calls(name, "MlflowClient")
            if not call.args and not call.keywords]
    assert not bare, f"MlflowClient() without a tracking URI: {bare}"


def test_the_contract_is_a_leaf_and_no_stage_imports_the_orchestrator():
    assert GRAPH["pipelines.contract"] <= {"pipelines.storage", "pipelines.config"}
    importers = {name for name, targets in GRAPH.items() if "pipelines.pipeline" in targets}
    assert importers == {"pipelines.plan", "pipelines.commands.run", "pipelines.commands.plan"}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_one_package_with_config_run_spec_and_command(stage):
    from pipelines.cli import COMMANDS

    for part in ("config", "run", "spec", "command"):
        assert f"pipelines.{stage}.{part}" in MODULES, f"pipelines/{stage}/{part}.py is missing"
    assert COMMANDS[stage] == f"pipelines.{stage}.command"
    spec = TREES[f"pipelines.{stage}.spec"]
    assert any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SPEC" for t in node.targets)
               for node in spec.body), f"pipelines/{stage}/spec.py defines no SPEC"


# tests/<dir> -> the source folder its tests cover; tests/support holds helpers and fixtures, no tests
TEST_FOLDERS = {"core": "vitpose_core", "pipelines": "pipelines", "infra": "infra"}


def test_test_folders_mirror_the_packages():
    """A test module lives in the folder of what it tests: tests/core for vitpose_core, tests/pipelines/<stage>
    for a stage package, tests/infra for infra/. A folder with no source counterpart fails here."""
    tests = ROOT / "tests"
    assert not list(tests.glob("test_*.py")), "test modules at the top of tests/: move them into their folder"
    assert not list((tests / "support").rglob("test_*.py")), "tests/support is for helpers, not tests"
    for module in tests.rglob("test_*.py"):
        top, *rest = module.relative_to(tests).parent.parts
        assert top in TEST_FOLDERS, f"{module}: tests/{top} mirrors no package ({sorted(TEST_FOLDERS)})"
        source = ROOT / TEST_FOLDERS[top] / Path(*rest)
        assert source.is_dir(), f"{module}: {source.relative_to(ROOT)} does not exist"
