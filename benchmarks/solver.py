"""The solve pass's solvers side by side: objective, gap and time, with time ratios to CBC.

    python benchmarks/solver.py [runs/final/score/block_library.json] [--seeds 3] [--repeats 3]

Libraries: random ones of 80 layers x 16, 50 and 160 variants (Llama-70B-like
costs, quality loss growing as blocks shrink, layers of unequal importance)
under three budgets, and optionally a library from our own pipeline. Each is
solved by ``scip`` and ``highs`` (hwopt's), by CBC through python-mip modelled
as NVIDIA's Puzzle demo (NVlabs/puzzle ``mip_nas``) does, and by the
``greedy`` baseline. A time is the best of ``--repeats`` runs and includes
building the solver's model from the parsed library. Then a 20-point Pareto
sweep at 80 x 50: hwopt builds its model once and moves the budget; CBC is
rebuilt per point, as the demo does. Last, ablations show where SCIP's speed
comes from. CBC needs ``pip install mip``; without it, its rows are skipped.

Before the ablations (with CBC installed), whole processes, as a user runs them:
``hwopt solve --library`` on an 80 x 16 library file against a python-mip/CBC
script that reads the same file and solves it as NVIDIA's demo does, each
started afresh (interpreter start and imports included), best of
``--repeats``, beside the floor of any SCIP process (python alone, and python
importing pyscipopt, which imports numpy).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pyscipopt import SCIP_PARAMSETTING

from hwopt.builtin.mip_solvers import GreedySolver, HighsSolver, ScipModel, ScipSolver
from hwopt.problem import Constraint, LinearForm, Problem, Solution, problem_from_library
from hwopt.solving import MEMORY, PARAMS, RUNTIME, read_library
from hwopt.sweep import SweepSpec, pareto_sweep

# budgets as fractions of the parent's totals: tight enough that all three bind in places
BUDGETS = {RUNTIME: 0.55, MEMORY: 0.6, PARAMS: 0.65}


def random_library(n_layers: int, n_variants: int, seed: int) -> dict:
    """A library shaped like Llama-70B's: variant 0 is the parent, the others keep a share of attention and FFN.

    Attention share ``a`` and FFN share ``f`` set the costs (with +-10% timing
    noise; memory is weights plus a KV cache that scales with attention), and
    the quality loss, which grows faster than linearly as a block shrinks and is
    scaled by the layer's importance (lognormal; the first and last layers 3x).
    """
    rng = np.random.default_rng(seed)
    library = {}
    for i in range(n_layers):
        importance = rng.lognormal(0, 1) * (3 if i in (0, n_layers - 1) else 1)
        layer = {}
        for j in range(n_variants):
            a = 1.0 if j == 0 else (0.0 if rng.random() < 0.15 else rng.uniform(0.05, 1))
            f = 1.0 if j == 0 else (0.0 if rng.random() < 0.1 else rng.uniform(0.05, 1))
            loss = 0.0 if j == 0 else importance * (0.3 * (1 - a) ** 2 + 0.2 * (1 - f) ** 2 + 0.002)
            layer[f"attention {a:.2f} ffn {f:.2f} #{j}"] = {
                "stats": {
                    "runtime_ms": 350 * a * rng.uniform(0.9, 1.1) + 460 * f * rng.uniform(0.9, 1.1),
                    "memory_mib": 288 * a + 672 * f + 480 * a,  # weights + KV cache
                    "num_params": 151e6 * a + 705e6 * f,
                },
                "metrics": {"kl_div": loss * rng.lognormal(0, 0.3)},
                "parent": j == 0,
            }
        library[f"layer_{i}"] = layer
    return library


def budgeted(library: dict) -> Problem:
    """The library's problem under ``BUDGETS`` (the keys it has) of its parent's totals."""
    free = problem_from_library(library, "metrics.kl_div", [])
    keys = [k for k in BUDGETS if free.has(k)]
    parent = free.totals(free.reference_choice(RUNTIME), tuple(keys))
    return dataclasses.replace(free, constraints=[Constraint(k, max=BUDGETS[k] * parent[k]) for k in keys])


class CbcSolver:
    """python-mip with CBC, modelled as NVlabs/puzzle's ``mip_nas``: a binary per (layer, variant), one per layer."""

    name = "cbc"

    def solve(self, problem: Problem, time_limit_s: float = 60.0) -> Solution | None:
        import mip

        start = time.perf_counter()
        model = mip.Model(solver_name=mip.CBC)
        model.verbose = 0
        x = {(layer, v): model.add_var(var_type=mip.BINARY)
             for layer in problem.layers for v in problem.variants[layer]}

        def total(key):
            return mip.xsum(problem.value(layer, v, key) * var for (layer, v), var in x.items())

        model.objective = (mip.maximize if problem.maximize else mip.minimize)(total(problem.objective))
        for layer in problem.layers:
            model += mip.xsum(x[layer, v] for v in problem.variants[layer]) == 1
        for c in problem.constraints:
            if c.max is not None:
                model += total(c.key) <= c.max
            if c.min is not None:
                model += total(c.key) >= c.min
        model.max_seconds = time_limit_s
        status = model.optimize()
        if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
            return None
        choice = {layer: v for (layer, v), var in x.items() if var.x >= 0.99}
        return problem.solution(choice, "cbc", status.name.lower(), model.gap, time.perf_counter() - start)


class ScipDefaults(ScipSolver):
    """Ablation: hwopt's SCIP model with SCIP's default separation and heuristics."""

    name = "scip, default settings"

    def compile(self, problem: Problem) -> ScipModel:
        model = ScipModel(problem)
        model.model.setSeparating(SCIP_PARAMSETTING.DEFAULT)
        model.model.setHeuristics(SCIP_PARAMSETTING.DEFAULT)
        return model


class WithoutReduction:
    """Ablation: a solver on the full program, dominated variants kept."""

    def __init__(self, solver):
        self.solver, self.name = solver, f"{solver.name}, no dominance reduction"

    def solve(self, problem: Problem, time_limit_s: float = 60.0) -> Solution | None:
        reduce = LinearForm._without_dominated
        LinearForm._without_dominated = lambda form: form
        try:
            return self.solver.solve(problem, time_limit_s)
        finally:
            LinearForm._without_dominated = reduce


def best_of(repeats: int, solver, problem: Problem, time_limit_s: float) -> Solution | None:
    runs = [solver.solve(problem, time_limit_s) for _ in range(repeats)]
    if runs[0] is None:
        return None
    return min(runs, key=lambda s: s.wall_s)


def compare(name: str, problem: Problem, solvers: list, repeats: int, time_limit_s: float) -> dict[str, float]:
    """Print one block of the table; returns each solver's time."""
    results = {s.name: best_of(repeats, s, problem, time_limit_s) for s in solvers}
    exact = [r.objective for r in results.values() if r is not None and r.solver != "greedy"]
    best = max(exact) if problem.maximize else min(exact)
    cbc = results.get("cbc")
    form = problem.linear_form()
    print(f"\n{name}: {len(problem.layers)} layers, {sum(map(len, problem.variants.values()))} variants "
          f"({len(form.entries)} undominated); {', '.join(c.describe() for c in problem.constraints)}")
    print(f"  {'solver':<34}{'objective':>14}{'vs best':>11}{'gap':>9}{'time s':>9}{'vs cbc':>8}  status")
    for solver_name, r in results.items():
        if r is None:
            print(f"  {solver_name:<34}{'no solution':>14}")
            continue
        gap = "-" if not np.isfinite(r.gap) else f"{r.gap:.1e}"
        ratio = f"{r.wall_s / cbc.wall_s:.2f}x" if cbc else "-"
        delta = (r.objective - best) / abs(best) if best else r.objective - best
        assert problem.is_feasible(r.choice), f"{solver_name} broke a budget"
        print(f"  {solver_name:<34}{r.objective:>14.6f}{delta:>+11.1e}{gap:>9}{r.wall_s:>9.3f}{ratio:>8}  {r.status}")
    return {n: r.wall_s for n, r in results.items() if r is not None}


def sweep_benchmark(problem: Problem, solvers: list, points: int, time_limit_s: float) -> None:
    spec = SweepSpec(RUNTIME, 0.4, 1.0, points)
    without_runtime = dataclasses.replace(problem, constraints=[c for c in problem.constraints if c.key != RUNTIME])
    print(f"\nPareto sweep, {points} budgets on {RUNTIME} from 0.4 to 1.0 of the parent, "
          f"{', '.join(c.describe() for c in without_runtime.constraints)}:")
    objectives = {}
    for solver in solvers:
        start = time.perf_counter()
        sweep = pareto_sweep(without_runtime, solver, spec, time_limit_s)
        wall = time.perf_counter() - start
        objectives[solver.name] = [np.nan if p.solution is None else p.solution.objective for p in sweep.points]
        solved = [o for o in objectives[solver.name] if not np.isnan(o)]
        monotone = all(b <= a + 1e-9 for a, b in zip(solved, solved[1:]))
        how = "model built once" if hasattr(solver, "compile") else "rebuilt per budget"
        print(f"  {solver.name:<8} {wall:7.2f} s for {points} points ({how}); {len(solved)} feasible, "
              f"objective {solved[0]:.4f} -> {solved[-1]:.4f}, {'monotone' if monotone else 'NOT monotone'}")
    exact = {n: o for n, o in objectives.items() if n != "greedy"}
    first = next(iter(exact.values()))
    same = all(np.allclose(o, first, rtol=1e-6, equal_nan=True) for o in exact.values())
    print(f"  exact solvers agree at every point: {same}")


# NVIDIA's demo as one process: read the library, a binary per (layer, variant), one per layer, budgets, CBC
CBC_SCRIPT = """
import json, sys
import mip
library, budgets = json.load(open(sys.argv[1])), json.loads(sys.argv[2])
model = mip.Model(solver_name=mip.CBC)
model.verbose = 0
x = {(layer, name): model.add_var(var_type=mip.BINARY) for layer, variants in library.items() for name in variants}
def total(group, key):
    return mip.xsum(library[layer][name][group][key] * var for (layer, name), var in x.items())
model.objective = mip.minimize(total("metrics", "kl_div"))
for layer, variants in library.items():
    model += mip.xsum(x[layer, name] for name in variants) == 1
for key, limit in budgets.items():
    model += total(*key.split(".")) <= limit
model.optimize()
json.dump({layer: name for (layer, name), var in x.items() if var.x >= 0.99}, open(sys.argv[3], "w"))
"""


def best_process_time(argv: list[str], repeats: int) -> float:
    """Wall time of the fastest of ``repeats`` fresh runs of ``argv``, which must succeed.

    A first, untimed run writes the bytecode of what it imports, as installing a package does: where
    ``PYTHONDONTWRITEBYTECODE`` is set (this workplace sets it), an editable checkout would otherwise be compiled
    from source in every timed run while site-packages (python-mip) has its bytecode from pip.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(argv, check=True, capture_output=True, env=env)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        best = min(best, time.perf_counter() - start)
    return best


def process_benchmark(repeats: int) -> None:
    """``hwopt solve --library`` against the CBC script, process against process, on an 80 x 16 library; then the
    floor of a SCIP process (``python -c pass``, ``python -c "import pyscipopt"``) timed the same way."""
    library = random_library(80, 16, 0)
    problem = budgeted(library)
    budgets = {c.key: c.max for c in problem.constraints}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block_library.json"
        path.write_text(json.dumps(library))
        hwopt = [sys.executable, "-m", "hwopt", "solve", "--library", str(path), "--json", f"{tmp}/hwopt.json",
                 *(arg for key, limit in budgets.items() for arg in ("--max", f"{key}={limit}"))]
        cbc = [sys.executable, "-c", CBC_SCRIPT, str(path), json.dumps(budgets), f"{tmp}/cbc.json"]
        hwopt_s, cbc_s = best_process_time(hwopt, repeats), best_process_time(cbc, repeats)
    # the floor of any process that solves with SCIP: the interpreter, and pyscipopt's import (numpy within it)
    bare_s = best_process_time([sys.executable, "-c", "pass"], repeats)
    scip_import_s = best_process_time([sys.executable, "-c", "import pyscipopt"], repeats)
    print(f"\nwhole processes on an 80 x 16 library (best of {repeats}): hwopt solve --library {hwopt_s:.3f} s, "
          f"python-mip/CBC script {cbc_s:.3f} s: hwopt takes {hwopt_s / cbc_s:.2f}x CBC's time")
    print(f"  floor of a SCIP process: python alone {bare_s:.3f} s, python importing pyscipopt {scip_import_s:.3f} s "
          f"({scip_import_s / cbc_s:.0%} of the CBC script's whole process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("library", nargs="?", type=Path, help="also solve this block_library.json")
    parser.add_argument("--seeds", type=int, default=3, help="random libraries per size (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="time each solve this often, keep the best (default 3)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve (default 60)")
    args = parser.parse_args()

    solvers = [ScipSolver(), HighsSolver()]
    if importlib.util.find_spec("mip") is None:
        print("python-mip is not installed (pip install mip): CBC is skipped, so no time ratios")
    else:
        solvers.append(CbcSolver())
    solvers.append(GreedySolver())

    times: dict[str, list[float]] = {s.name: [] for s in solvers}
    ratios: dict[str, list[float]] = {s.name: [] for s in solvers}
    cases = [(f"random 80x{v} seed {seed}", random_library(80, v, seed)) for v in (16, 50, 160)
             for seed in range(args.seeds)]
    if args.library:
        cases.append((str(args.library), read_library(args.library)))
    for name, library in cases:
        measured = compare(name, budgeted(library), solvers, args.repeats, args.time_limit)
        for solver_name, wall in measured.items():
            times[solver_name].append(wall)
            if "cbc" in measured:
                ratios[solver_name].append(wall / measured["cbc"])

    print(f"\nmedian over {len(cases)} libraries:")
    for solver_name, walls in times.items():
        ratio = f", {statistics.median(ratios[solver_name]):.2f}x CBC's time" if ratios[solver_name] else ""
        print(f"  {solver_name:<8} {statistics.median(walls):.3f} s{ratio}")

    sweep_benchmark(budgeted(random_library(80, 50, 0)), solvers, 20, args.time_limit)
    if any(s.name == "cbc" for s in solvers):
        process_benchmark(args.repeats)

    print("\nablations (where SCIP's time goes), on the 80 x 160 libraries:")
    for seed in range(args.seeds):
        compare(f"random 80x160 seed {seed}", budgeted(random_library(80, 160, seed)),
                [ScipSolver(), ScipDefaults(), WithoutReduction(ScipSolver()), WithoutReduction(HighsSolver()),
                 *(s for s in solvers if s.name == "cbc")], args.repeats, args.time_limit)


if __name__ == "__main__":
    main()
