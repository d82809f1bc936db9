"""The package's import graph: no cycles (lazy imports inside functions included), no side doors.

Every module of ``hwopt/`` is parsed (not imported); an edge A -> B is any
``import`` or ``from ... import`` in A, at any depth, that names B or a module
inside it. ``from hwopt.x import name`` where ``name`` is a submodule of the
package ``hwopt.x`` counts as an edge to that submodule. Imports under
``if TYPE_CHECKING:`` never run, so they are no edge.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hwopt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST):
    """Every import statement in ``tree``, at any depth, except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from imports(node)


def import_graph() -> dict[str, set[str]]:
    """module -> the hwopt modules it imports."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in paths}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        for node in imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(package + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base
                           for alias in node.names]
            for target in targets:
                while target and target not in paths:  # hwopt.a.b.func -> hwopt.a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def is_core(module: str) -> bool:
    return module != "hwopt.plugins" and not module.startswith("hwopt.builtin")


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "hwopt.plugins" in graph["hwopt.cli"]  # imported inside a function
    assert "hwopt.hookspecs" in graph["hwopt.plugins"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_modules_import_no_builtin_plugin():
    side_doors = [f"{a} -> {b}" for a, targets in import_graph().items() if is_core(a)
                  for b in targets if b.startswith("hwopt.builtin")]
    assert not side_doors, "core modules reach into built-in plugins: " + ", ".join(sorted(side_doors))


def test_model_code_does_not_import_the_plugin_layer():
    graph = import_graph()
    offenders = [f"{a} -> {b}" for a, targets in graph.items() if a.startswith("hwopt.model.")
                 for b in targets if b == "hwopt.plugins" or b.startswith("hwopt.builtin")]
    assert not offenders, ", ".join(sorted(offenders))


def test_each_pass_describes_itself_in_its_own_module():
    """``hwopt.passes.<name>`` declares pass ``name`` (``INFO``), in pipeline order, with every pass it reads run
    before it and its check and call its own; reading the descriptions imports neither torch nor numpy."""
    from hwopt import passes
    from hwopt.pipeline import PASSES, PassInfo

    modules = sorted(p.stem for p in (PACKAGE / "passes").glob("*.py") if p.stem != "__init__")
    assert sorted(PASSES) == modules
    assert tuple(passes.PASS_INFO) == PASSES
    for name, info in passes.PASS_INFO.items():
        module = getattr(passes, name)
        assert isinstance(info, PassInfo) and info is module.INFO and info.name == name
        assert info.check.__module__ == info.call.__module__ == module.__name__
        assert all(PASSES.index(up) < PASSES.index(name) for up in info.reads), name
    loaded = subprocess.run([sys.executable, "-c", "import sys, hwopt.passes; "
                             f"print([m for m in {HEAVY + NUMERIC!r} if m in sys.modules])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing the passes' descriptions loads {loaded}"


LIBRARY = {f"layer_{i}": {f"v{j}": {"stats": {"runtime_ms": 1.0 + i + j, "memory_mib": 10.0 * (4 - j)},
                                      "metrics": {"kl_div": 0.1 * j}} for j in range(4)} for i in range(3)}
HEAVY = ("torch", "transformers")
NUMERIC = ("numpy", "scipy")  # what solving and costing need, and nothing that only lists or explains


@pytest.mark.parametrize("argv, heavy", [
    (["--help"], HEAVY + NUMERIC), (["--version"], HEAVY + NUMERIC), (["targets"], HEAVY + NUMERIC),
    (["plugins"], HEAVY + NUMERIC), (["solve", "--help"], HEAVY + NUMERIC),
    (["solve", "--library", "{library}", "--max", "stats.runtime_ms=9", "--json", "{out}"], HEAVY),
    (["estimate", "--model", "llama-3.1-70b", "--target", "h100", "--json"], HEAVY),
    (["estimate", "--model", "{child}", "--target", "h100"], HEAVY),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_light_commands_import_neither_torch_nor_transformers(argv, heavy, tmp_path):
    library = tmp_path / "block_library.json"
    library.write_text(json.dumps(LIBRARY))
    child = PACKAGE.parent / "tests" / "data" / "real_world" / "puzzletron-child-llama8b.config.json"
    argv = [a.format(library=library, out=tmp_path / "solutions.json", child=child) for a in argv]
    assert main_in_fresh_python(argv, heavy) in ("0 []", "None []"), f"hwopt {' '.join(argv)}"
    if "--library" in argv:  # it did solve
        assert json.loads((tmp_path / "solutions.json").read_text())["solutions"]


def main_in_fresh_python(argv: list[str], heavy: tuple[str, ...]) -> str:
    """``hwopt.cli.main(argv)`` in a new interpreter: "<exit code> [the modules of ``heavy`` it imported]"."""
    code = ("import sys, contextlib, io\n"
            "from hwopt.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            f"        rc = main({argv!r})\n"
            "    except SystemExit as exc:\n"
            "        rc = exc.code\n"
            f"print(rc, sorted(m for m in {heavy!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [
    ["optimize", "--model", "no-such-model"], ["optimize", "--target", "no-such-gpu"],
    ["profile", "--scenario", "12x"], ["solve", "--speedup", "-1"], ["optimize", "--memory", "lots"],
    ["evaluate", "--model", "no/such/child"],
], ids=" ".join)
def test_a_mistyped_option_fails_before_torch_is_imported(argv, tmp_path):
    """Bad names and numbers are refused in a fraction of a second, not after the seconds torch takes to load."""
    assert main_in_fresh_python([*argv, *(["--workdir", str(tmp_path / "run")] if argv[0] != "evaluate" else [])],
                                HEAVY) == "2 []"
    assert not (tmp_path / "run").exists()
