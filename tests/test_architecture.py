"""The shape of the house: no import cycles inside plot_ds, DeepSpeed's internals touched from one
module only, functions and modules small enough to read, the DeepSpeed JSONs shipped in the package."""

import ast
import json
import re
import warnings
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "plot_ds"
PATCHES = PACKAGE / "engine" / "deepspeed_patches.py"
# DeepSpeed's public surface as plot_ds uses it; everything else (deepspeed.runtime, .checkpoint,
# .comm.torch, .utils.zero_to_fp32, ...) is an internal that only deepspeed_patches may import.
# ALST's module is where DeepSpeed's own tutorial (deepspeed.ai/tutorials/ulysses-alst-sequence-
# parallelism) imports UlyssesSPAttentionHF from: its documented surface, used as documented.
PUBLIC_DEEPSPEED = {
    "deepspeed",
    "deepspeed.comm",
    "deepspeed.accelerator",
    "deepspeed.utils",
    "deepspeed.zero",
    "deepspeed.runtime.sequence_parallel.ulysses_sp",
}
# Counted on the formatted code (ruff format, width 120), which spends more lines on a long call
# than hand wrapping did. A module holds one concept whole (the config's sections are one file), so
# the cap is set where no file must be split for its length alone.
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 500


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """plot_ds modules ``path`` imports, at module level or inside functions."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_plot_ds():
    graph = import_graph()
    assert (
        len(graph) > 20 and "plot_ds.training.checkpointing" in graph["plot_ds.training.hf_export"]
    )  # the graph is read
    assert cycles(graph) == []


# The layers, bottom first: a module imports only from its own layer and those below it. The
# contract (batch, counts, errors, files written whole, config values, the built-in assets) is at
# the bottom; the losses stand on it alone; the forward produces what they read; the engine is
# built from the config; the memory plan reads the config, the engine's and the forward's own
# numbers; the training loop stands on everything; plot-compare and the console
# entry points on top.
LAYERS = [
    ["pair_batch", "errors", "atomic", "config_values", "assets"],
    ["objectives"],
    ["data"],
    ["forward"],
    ["config"],
    ["engine"],
    ["distributed"],
    ["planning"],
    ["training"],
    ["compare", "cli", "launch_entry"],
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "pair_batch"
    return next(level for level, names in enumerate(LAYERS) if top in names)


def test_every_import_runs_down_the_layers():
    graph = import_graph()
    assert {module.split(".")[1] for module in graph if module.count(".")} == {n for layer in LAYERS for n in layer}
    upward = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def deepspeed_private_names() -> set[str]:
    """Every single-underscore name DeepSpeed's own source defines or assigns as an attribute."""
    import deepspeed

    names = set()
    for path in Path(deepspeed.__file__).parent.rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def is_internal_module(name: str) -> bool:
    """A string naming one of DeepSpeed's internal modules (for importlib)."""
    import importlib.util

    if not re.fullmatch(r"deepspeed(\.\w+)+", name) or name in PUBLIC_DEEPSPEED:
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def reaches_into_deepspeed(path: Path, private: set[str]) -> list[str]:
    """Where ``path`` imports a DeepSpeed internal module or names one of DeepSpeed's private
    attributes (as an attribute of anything but ``self``, or as a string, e.g. for getattr)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("deepspeed"):
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if node.module not in PUBLIC_DEEPSPEED or any(
                m.startswith("deepspeed.utils.zero_to_fp32") for m in modules
            ):
                found.append(f"{where} imports {node.module}")
        elif isinstance(node, ast.Import):
            found += [
                f"{where} imports {a.name}"
                for a in node.names
                if a.name.startswith("deepspeed.") and a.name not in PUBLIC_DEEPSPEED
            ]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in private
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os", "sys"))
        ):
            found.append(f"{where} names .{node.attr}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and (node.value in private or is_internal_module(node.value))
        ):
            found.append(f"{where} names {node.value!r}")
    return found


def test_only_the_patches_module_reaches_into_deepspeed_internals():
    private = deepspeed_private_names()
    assert {"_config", "_create_fp32_partitions", "_prepare_fp32_grad_for_sub_group"} <= private
    # The check finds what the patches module does on purpose: it can fail.
    patches_uses = "\n".join(reaches_into_deepspeed(PATCHES, private))
    for expected in (
        "imports deepspeed.runtime.zero.stage3",
        "names ._config",
        "'deepspeed.comm.torch'",
        "imports deepspeed.checkpoint",
    ):
        assert expected in patches_uses, patches_uses
    others = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PATCHES
        for hit in reaches_into_deepspeed(path, private)
    ]
    assert others == []


def long_functions_and_modules() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_functions_and_modules_stay_readable_in_one_sitting():
    assert long_functions_and_modules() == []


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_the_packaged_ds_configs_are_the_top_level_ones(name):
    """ds_configs/ is for users to copy and edit; plot_ds/ds_configs/ is what an installed package
    reads. They must not drift apart."""
    top, packaged = REPO / "ds_configs" / name, PACKAGE / "ds_configs" / name
    assert json.loads(top.read_text()) == json.loads(packaged.read_text())
    assert top.read_bytes() == packaged.read_bytes()


def test_unchecked_deepspeed_versions_are_warned_about(monkeypatch):
    import deepspeed

    from plot_ds.engine import deepspeed_patches

    assert deepspeed_patches.version_warning(deepspeed.__version__) is None  # the installed one was checked
    assert deepspeed_patches.version_warning("0.19.0") is None
    message = deepspeed_patches.version_warning("0.20.1")
    assert "DeepSpeed 0.20.1" in message and "keep_one_fp32_copy" in message and "0.19.x" in message
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    deepspeed_patches.check_deepspeed_version.cache_clear()
    try:
        with pytest.warns(UserWarning, match="DeepSpeed 0.21.0: plot_ds patches DeepSpeed internals"):
            deepspeed_patches.check_deepspeed_version()
    finally:
        deepspeed_patches.check_deepspeed_version.cache_clear()
    monkeypatch.setattr(deepspeed, "__version__", "0.19.8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deepspeed_patches.check_deepspeed_version()
    deepspeed_patches.check_deepspeed_version.cache_clear()


# ------------------------------------------------------------------ one step, one contract
LOSS_MODULES = ("plot_ds.objectives.objective", "plot_ds.objectives.plot_loss", "plot_ds.objectives.ot_solvers")
CONTRACT = {"plot_ds", "plot_ds.pair_batch", "plot_ds.objectives", "plot_ds.objectives.terms"}


def test_the_losses_are_leaves_on_the_contract():
    """Importing every loss loads torch, the contract (batch, counts, totals, log-prob outputs, the
    terms' registry) and the losses themselves: no DeepSpeed, no transformers, nothing of the
    forward or the engine."""
    import subprocess
    import sys

    script = (
        f"import sys; import {', '.join(LOSS_MODULES)}; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('plot_ds', 'deepspeed', 'transformers', 'datasets', 'peft'))))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.split()
    )
    assert loaded == CONTRACT | set(LOSS_MODULES), loaded - CONTRACT - set(LOSS_MODULES)


def calls_in(path: Path, function: str) -> set[str]:
    """Names called inside ``function`` (a module-level function of ``path``)."""
    tree = ast.parse(path.read_text())
    body = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    return {
        node.func.id if isinstance(node.func, ast.Name) else node.func.attr
        for node in ast.walk(body)
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
    }


@pytest.mark.parametrize(
    "module,function",
    [
        ("training/loop", "train_step"),
        ("training/evaluation", "evaluate"),
        ("forward/micro_batch", "pre_pass"),
        ("training/reference_cache", "compute_logps"),
    ],
)
def test_every_micro_batch_goes_through_the_one_function(module, function):
    """Training, evaluation, the global-batch pre-pass and the reference cache all run a micro-batch
    through ``micro_batch.forward_micro_batch`` (``micro_batch_results`` walks a share through it);
    only it and the reference's own forward call ``forward_pairs``."""
    called = calls_in(PACKAGE / f"{module}.py", function)
    assert called & {"forward_micro_batch", "micro_batch_results"}, called
    callers = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "forward_pairs(" in path.read_text().replace("def forward_pairs(", "")
    }
    assert callers == {"forward/micro_batch.py", "forward/reference.py"}, callers


def test_no_code_reads_a_batchs_counts_by_position():
    """A batch's counts are named fields (``PairCounts``): nothing indexes ``.counts``, in the
    package, the benchmarks or the test workers."""
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "bench").glob("*.py"), *(REPO / "tests" / "workers").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Subscript) else None
            if isinstance(value, ast.Attribute) and value.attr == "counts":
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []


@pytest.mark.parametrize("check", [["format", "--check", "--diff"], ["check"]], ids=["formatted", "lint"])
def test_the_tree_is_formatted_and_lint_free(check):
    """ruff, as configured in pyproject.toml (width 120; pyflakes and pycodestyle's errors): run
    ``ruff format .`` before committing."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ruff", *check, "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
