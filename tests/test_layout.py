"""The package's import structure: imports go down the floors, never up, never in a circle.

Every ``import`` / ``from ... import`` of every file (module level and inside
functions) is read with ``ast``; nothing is executed.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Floors from the bottom up. A module may import modules of its own floor or below.
FLOORS = (
    ("lavi_jax.config", "lavi_jax.sharding", "lavi_jax.distributed", "lavi_jax.storage"),
    ("lavi_jax.models", "lavi_jax.data", "lavi_jax.lora"),
    ("lavi_jax.checkpoint", "lavi_jax.generate", "lavi_jax.hf"),
    ("lavi_jax.eval",),
    ("lavi_jax.train",),
    ("lavi_jax.demo", "lavi_jax.predict", "lavi_jax.serve"),
)
TOP = ("conversions", "benchmarks", "tests", "train", "eval", "demo")  # scripts and tools above the library


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def python_files(folder: str):
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(base, f)


def imports(path: str, modules=()) -> set[str]:
    """Absolute module names ``path`` imports. ``from a import b`` counts as ``a.b`` when that is one of
    ``modules``, else as ``a``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module_name(path) if path.endswith("__init__.py") else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return out


def library_graph() -> dict[str, set[str]]:
    """module -> the lavi_jax modules it imports (names that are not modules are dropped)."""
    files = {module_name(p): p for p in python_files("lavi_jax")}
    graph = {}
    for name, path in files.items():
        # A submodule's own ancestor packages are imported before it by Python itself: not an edge.
        graph[name] = {m for m in imports(path, files) if m in files and not (name == m or name.startswith(m + "."))}
    return graph


def floor(module: str) -> int | None:
    for level, members in enumerate(FLOORS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return level
    return None


def test_every_library_module_has_a_floor():
    unplaced = [m for m in library_graph() if m != "lavi_jax" and floor(m) is None]
    assert not unplaced, f"modules outside FLOORS: {unplaced}"


def test_library_never_imports_scripts_tests_or_tools():
    bad = [(p, m) for p in python_files("lavi_jax") for m in imports(p) if m.split(".")[0] in TOP]
    assert not bad, bad


def test_imports_only_go_down():
    upward = [(src, dst) for src, targets in library_graph().items() if src != "lavi_jax"
              for dst in targets if floor(dst) > floor(src)]
    assert not upward, "upward imports: " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_no_import_cycles():
    graph = library_graph()
    graph.pop("lavi_jax", None)  # the package face imports its public names; nothing under it imports it back
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("folder,forbidden", [("conversions", ("benchmarks", "tests")), ("benchmarks", ("tests",))])
def test_tools_do_not_import_tests(folder, forbidden):
    bad = [(p, m) for p in python_files(folder) for m in imports(p) if m.split(".")[0] in forbidden]
    assert not bad, bad


def test_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The checks above would fail on a violation: the helpers see both kinds in a made-up file."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from lavi_jax.train import loop\n")
    assert "lavi_jax.train.loop" in imports(str(f), {"lavi_jax.train.loop"}) and floor("lavi_jax.train.loop") > floor("lavi_jax.data.batch")
