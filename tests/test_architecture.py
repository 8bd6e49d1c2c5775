"""The package's shape: no import cycle among calibkern's modules (every import counted, lazy ones inside
functions too), ``_validate`` imports nothing from calibkern, every cited document is in the repository, the
benchmark report is the one its generator writes, and
every kernel the custom ops dispatch exists in each backend with the same parameters (docs/architecture.md)."""

import ast
import importlib
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "calibkern"


def modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    found = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imported(module: str, path: str, known: dict[str, str]) -> set[str]:
    """The calibkern modules ``module`` imports anywhere in its file (``from . import x`` names module x)."""
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith(PACKAGE) and name != module:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imported(module, path, known) for module, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_validate_imports_nothing_from_calibkern():
    assert import_graph()["calibkern._validate"] == set()


def tracked_text_files():
    for directory in ("calibkern", "docs", "benchmarks", "tests"):
        for folder, _, files in os.walk(os.path.join(ROOT, directory)):
            for name in files:
                if name.endswith((".py", ".md", ".h", ".cpp")):
                    yield os.path.join(folder, name)
    yield os.path.join(ROOT, "README.md")


def test_no_spec_outside_the_repository_is_cited():
    cited = [path for path in tracked_text_files() if re.search(r"\bSPEC\s*§", open(path, encoding="utf-8").read())]
    assert cited == []


@pytest.mark.parametrize("path", [p for p in tracked_text_files() if "docs/" in open(p, encoding="utf-8").read()])
def test_cited_docs_exist_with_their_sections(path):
    """Every ``docs/<name>.md`` and ``docs/<name>.md#anchor`` a file cites exists, the anchor as a heading."""
    text = open(path, encoding="utf-8").read()
    for doc, anchor in re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", text):
        target = os.path.join(ROOT, "docs", doc)
        assert os.path.exists(target), f"{path} cites docs/{doc}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", open(target, encoding="utf-8").read(), flags=re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{path} cites docs/{doc}#{anchor}"


def test_benchmark_report_is_what_render_writes(tmp_path):
    """benchmarks/RESULTS.md is generated (``run_benchmarks.py --render``: results/cpu.json, then the sections kept by
    hand in benchmarks/before_after.md), so an edit made to it alone would be lost at the next run."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    rendered = tmp_path / "RESULTS.md"
    report.write_markdown(str(rendered), report.read_json(os.path.join(ROOT, "benchmarks", "results", "cpu.json")),
                          "results/cpu.png")
    with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), encoding="utf-8") as handle:
        assert handle.read() == rendered.read_text(encoding="utf-8"), (
            "benchmarks/RESULTS.md differs from what run_benchmarks.py --render writes: put hand-kept sections in "
            "benchmarks/before_after.md and run python benchmarks/run_benchmarks.py --render")


def test_readme_stays_short():
    """What calibkern is, the commands, an example, headline numbers and links: the rest lives in docs/."""
    assert len(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()) <= 6500


def test_tests_import_no_other_test_module():
    """Shared test code lives in tests/helpers.py (and tests/hf_tiny.py); conftest.py holds fixtures only."""
    offenders = []
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "tests", name), encoding="utf-8").read())
            for node in ast.walk(tree):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [module or ""]
                offenders += [f"{name}: {n}" for n in names if n.startswith(("test_", "conftest"))]
    assert offenders == []


def dispatched_ops() -> dict[str, int]:
    """Op name -> number of positional arguments, for every call ``_kernels(backend, x).<op>(...)`` of
    calibkern/ops/custom_ops.py: the kernels the custom ops run on whichever backend is picked."""
    tree = ast.parse(open(os.path.join(ROOT, PACKAGE, "ops", "custom_ops.py"), encoding="utf-8").read())
    ops = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Call) and getattr(node.func.value.func, "id", None) == "_kernels":
            assert ops.setdefault(node.func.attr, len(node.args)) == len(node.args), node.func.attr
    return ops


def backend_modules() -> dict[str, object]:
    """The three backend modules by name; ``calibkern.ops.triton`` imports without triton (its kernels load on
    first call), ``calibkern._cpp`` only where the extension is built."""
    found = {"torch": importlib.import_module("calibkern.reference"),
             "triton": importlib.import_module("calibkern.ops.triton")}
    try:
        found["cpp"] = importlib.import_module("calibkern._cpp")
    except ImportError:
        pass
    return found


def test_the_op_finder_finds_the_kernels():
    assert {"binned_stats", "hard_bin_loss", "em_stats", "cross_entropy_"} <= set(dispatched_ops())


@pytest.mark.parametrize("op", sorted(dispatched_ops()))
def test_every_backend_implements_each_dispatched_op_with_the_same_parameters(op):
    """An op added to one backend only, or with other parameter names, fails here (docs/architecture.md)."""
    modules = backend_modules()
    want = list(inspect.signature(getattr(modules["torch"], op)).parameters)
    assert len(want) == dispatched_ops()[op], f"custom_ops calls {op} with {dispatched_ops()[op]} arguments"
    for name, module in modules.items():
        assert hasattr(module, op), f"backend {name!r} ({module.__name__}) has no {op}"
        assert list(inspect.signature(getattr(module, op)).parameters) == want, f"{name}.{op}"


@pytest.mark.parametrize("op", sorted(dispatched_ops()))
def test_every_dispatched_op_is_bound_in_the_extension_and_documented(op):
    """The C++ side, read as text (no build needed): ``_C.<op>`` is bound in csrc/bindings.cpp; and the
    contract entry in docs/backends.md#functions."""
    bindings = open(os.path.join(ROOT, "csrc", "bindings.cpp"), encoding="utf-8").read()
    assert f'm.def("{op}"' in bindings
    contract = open(os.path.join(ROOT, "docs", "backends.md"), encoding="utf-8").read()
    assert re.search(rf"^{re.escape(op)}\(", contract.split("### Functions", 1)[1], flags=re.MULTILINE), op
