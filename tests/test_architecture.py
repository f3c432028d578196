"""The import directions of ARCHITECTURE.md, read from the source (an AST scan of every import,
function-level ones included): no import circle, and none of the arrows that must never exist;
and, in a fresh process, that the commands that read no data start without TensorFlow."""

import ast
import pathlib
import sys

import pytest

from tests import forked_commands

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("bloom_jax", "partitioning")
# Third-party roots the model may import besides the standard library.
MODEL_ALLOWED = {"jax", "flax", "numpy"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p))
            for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = sources()


def imported(tree: ast.Module) -> set[str]:
    """Every module name an import statement in `tree` names (`from a import b` names a and a.b)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_imports(name: str) -> set[str]:
    return {m for m in imported(MODULES[name]) if m in MODULES and m != name}


def is_command(name: str) -> bool:
    """A module run with `python -m` (it has an `if __name__ == "__main__":` block)."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in MODULES[name].body)


def find_cycle() -> list[str] | None:
    """One import circle among the project's modules, or None."""
    graph = {name: project_imports(name) - {p for p in PACKAGES} for name in MODULES}
    state = {}  # name -> "open" while on the path, "done" after

    def visit(name, path):
        state[name] = "open"
        for nxt in sorted(graph[name]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [name, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            if cycle:
                return cycle
    return None


def test_the_scan_sees_the_known_arrows():
    assert "bloom_jax.sharded_step" in project_imports("bloom_jax.trainer")
    assert "partitioning.rules" in project_imports("bloom_jax.sharded_step")
    assert is_command("bloom_jax.plan") and not is_command("bloom_jax.trainer")


def test_no_import_circle():
    assert find_cycle() is None, " -> ".join(find_cycle())


def test_the_model_imports_only_jax_flax_and_numpy():
    third_party = {m.split(".")[0] for m in imported(MODULES["bloom_jax.model"])} - {"__future__"}
    assert third_party - set(sys.stdlib_module_names) <= MODEL_ALLOWED


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("bloom_jax.data")])
def test_data_never_imports_the_model_or_the_loop(name):
    forbidden = {"bloom_jax.model", "bloom_jax.step", "bloom_jax.sharded_step",
                 "bloom_jax.trainer", "bloom_jax.checkpoints"}
    assert not project_imports(name) & forbidden


@pytest.mark.parametrize("name", [n for n in MODULES if not is_command(n)])
def test_library_rooms_never_import_a_command(name):
    commands = {n for n in MODULES if is_command(n)}
    assert not project_imports(name) & commands


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("partitioning")])
def test_partitioning_never_imports_the_loop_or_data(name):
    assert not {m for m in project_imports(name) if m.startswith("bloom_jax")}


def test_command_wiring_imports_nothing_of_the_model_or_loop():
    assert not {m for m in project_imports("bloom_jax.configs") if m != "bloom_jax"}


def test_the_commands_that_read_no_data_start_without_tensorflow():
    """plan and bench (budget_report with plan) import neither seqio, nor clu's writers, nor
    TensorFlow behind them (6 of the 9.5 s that `plan --help` took on a 2-core CPU)."""
    assert forked_commands.heavy_modules_after(
        "import bloom_jax.plan, bloom_jax.bench", ("seqio", "clu.metric_writers", "tensorflow")
    ) == []
