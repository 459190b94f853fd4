"""Imports flow one way. Every module's imports (read with ast, those inside functions too: an
import hidden in a function is still a dependency) must point at its own layer or a lower one,
the module graph must have no cycle, and a job module must not import another job module (jobs
find each other's outputs through the stage graph, jobs.stages)."""

import ast
from pathlib import Path

from tests.conftest import REPO

# Highest first. A module belongs to the first layer whose prefix it has.
LAYERS = [
    ("jobs.cli", "jobs.submit"),  # the commands: may call any job
    ("jobs",),  # the jobs and their helpers (jobs.common, jobs.stages, jobs.runner)
    ("drray.launch",),  # SLURM, Ray over an allocation
    ("drray.distributed",),  # the only place Ray's API is used
    ("drray.engine", "drray.settings"),  # the fit loop, checkpoints, optimisers; whole-config checks
    ("drray.methods",),  # a method's views, step and batch keys
    ("drray.models", "drray.losses", "drray.data", "drray.metrics", "drray.plots", "drray.report",
     "drray.artifacts", "drray.progress"),
    ("drray.config",),
    ("drray",),  # the package itself: its version
]
JOB_HELPERS = {"jobs.common", "jobs.stages", "jobs.runner", "jobs"}
COMMANDS = {"jobs.cli", "jobs.submit"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("drray", "jobs") for p in (REPO / top).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:  # `from drray.data import shards` -> drray.data.shards
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def layer(module: str) -> int:
    for depth, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return len(LAYERS) - depth
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def test_every_import_points_down_the_layers():
    wrong = [f"{m} (layer {layer(m)}) imports {i} (layer {layer(i)})"
             for m, deps in graph().items() for i in deps
             if layer(i) > layer(m) and not m.startswith(i + ".")]  # a package's modules may see it
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_job_modules_do_not_import_each_other():
    wrong = [f"{m} imports {i}" for m, deps in graph().items()
             if m.startswith("jobs.") and m not in COMMANDS | JOB_HELPERS
             for i in deps if i.startswith("jobs") and i not in JOB_HELPERS]
    helpers_importing_jobs = [f"{m} imports {i}" for m, deps in graph().items() if m in JOB_HELPERS
                              for i in deps if i.startswith("jobs.") and i not in JOB_HELPERS]
    assert not wrong + helpers_importing_jobs, "\n".join(wrong + helpers_importing_jobs)


def test_the_module_graph_has_no_cycle():
    deps = graph()
    # parents are imported with their modules (`import drray.data.x` runs drray/data/__init__),
    # but that is not a dependency of the package on its module: leave those edges out
    edges = {m: {i for i in d if not m.startswith(i + ".")} for m, d in deps.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for i in sorted(edges.get(m, ())):
            if state.get(i) == "open":
                cycles.append(" -> ".join(path[path.index(i):] + [i]) if i in path else f"{m} -> {i}")
            elif i not in state:
                visit(i, path + [i])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_test_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import inside a function counts (the hidden circle it exists for)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from jobs import distill\n    import drray.config\n")
    found = imports_of(source, {"jobs", "jobs.distill", "drray", "drray.config"})
    assert found == {"jobs", "jobs.distill", "drray.config"}


def test_a_read_task_imports_no_torch():
    """Ray Data's read tasks import their function's module in every worker: the shard reads'
    module (drray.data.selection) must not pull in torch (~350 MB a worker)."""
    import subprocess
    import sys

    code = "import sys, drray.data.selection; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# The functions that may read a grade: preparing the data (which stores it), the label budget
# (jobs.common.labeled_subset, the one reader of training grades, and its record in
# RUN/labels.parquet), and the evaluation's test sets. A stage that read a training grade any
# other way would spend labels outside the budget: it has to go through labeled_subset.
GRADE_READERS = {
    ("drray/data/prepare.py", "build_manifest"), ("drray/data/prepare.py", "prepare_rows"),
    ("drray/data/sources.py", "_read_folder"), ("drray/data/sources.py", "parse_grade"),
    ("drray/distributed/prepare.py", "check_positive"), ("drray/distributed/prepare.py", "prepare_dataset"),
    ("drray/distributed/prepare.py", "take"),
    ("jobs/common.py", "labeled_subset"), ("jobs/common.py", "record_labels_read"),
    ("jobs/evaluate.py", "labeled_targets"), ("jobs/evaluate.py", "prepared_imageability"),
}


def test_only_the_label_budget_and_the_test_sets_read_a_grade():
    readers = set()
    for path in modules().values():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                    isinstance(node, ast.Constant) and node.value == "grade" for node in ast.walk(fn)):
                readers.add((str(path.relative_to(REPO)), fn.name))
    assert readers == GRADE_READERS
    # the evaluation reads the grades of its test sets only: the test split and the external set
    source = (REPO / "jobs" / "evaluate.py").read_text()
    calls = [ast.unparse(c) for c in ast.walk(ast.parse(source))
             if isinstance(c, ast.Call) and ast.unparse(c.func) == "labeled_targets"]
    assert sorted(calls) == ["labeled_targets(external, positive, None)", "labeled_targets(eyepacs, positive, 'test')"]
