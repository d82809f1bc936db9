"""solve: the child, chosen from the scored library under the run's budgets by a MIP (``hwopt.solving``).

With ``--coupled-bld N`` it first solves decoupled, trains the (attention,
FFN) pairs of N diverse solutions jointly, scores them again and solves
once more (Puzzle, arXiv 2411.19146, Table 6). On a CPU target it times the
chosen child against the parent and solves again until one measures the
speedup asked. Then (``--select-tokens``) the MIP's solutions and the
layer-dropping child as fast are each distilled briefly and the one closest
to the parent on validation English goes first (``hwopt.selection``): the
child uptrain trains. Imports torch only when it runs (see
``hwopt.passes.profile``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.pipeline import PassInfo, atomic_write_json
from hwopt.settings import DATA, PLACEMENT

if TYPE_CHECKING:
    from hwopt.memory_plan import MemoryPlan
    from hwopt.run import Run


def check(run: Run) -> None:
    """A budget is given; ``--speedup-checks`` is not negative."""
    if not run.settings.budgets.keys():
        raise HwoptError("solve needs a budget: --speedup, --memory, --throughput, --latency, --ttft or --params")
    if run.settings.speedup_checks < 0:
        raise HwoptError(f"--speedup-checks must be 0 (off) or more, not {run.settings.speedup_checks}")
    if run.settings.select_tokens < 0:
        raise HwoptError(f"--select-tokens must be 0 (off) or more, not {run.settings.select_tokens}")


def call(run: Run, out: Path) -> None:
    """Solve, check the speedup where the target is this machine, keep the best candidate child
    (``hwopt.selection``), write the solutions and the per-layer picture."""
    from hwopt.evaluate import measured_speedup
    from hwopt.lowering.runtimes import runnable_library
    from hwopt.plots import per_layer_runtime
    from hwopt.profiling import layer_rows, model_variants
    from hwopt.progress import console
    from hwopt.selection import select
    from hwopt.solving import maximizes, meet_measured_speedup, solve

    s = run.settings
    costs = run.read_json(run.output("profile", "costs"))
    library = runnable_library(run.read_json(run.output("score", "block_library")), run.runtime, run.source.config)
    if s.coupled_bld:
        library = coupled_bld(run, library, costs, out)

    def solve_at(speedup: float | None) -> dict:
        return solve(library, costs, dataclasses.replace(s.budgets, speedup=speedup), s.objective_key, s.solver,
                     run.output("solve", "solutions", out), maximizes(s.objective_key), s.num_solutions,
                     s.min_diversity, s.time_limit)

    coupled_dir = run.output("solve", "coupled", out)
    measure = None
    if checks_speed(run) and costs["source"]["kind"] == "measured":
        # the target is this machine: time the chosen child against the parent, whole, as the report will
        def measure(solution: dict) -> dict:
            child = run.assemble(solution, coupled_dir)
            return measured_speedup(run.deployed_parent, child.to(run.deployed.dtype), run.scenario)

        result, checks = meet_measured_speedup(solve_at, lambda result: measure(result["solutions"][0]), s.speedup,
                                               s.speedup_checks)
    else:
        result, checks = solve_at(s.speedup), []
    if s.select_tokens:
        result = select(run, result, library, costs, coupled_dir, measure)
    # the child kept, which need not be the last one solved
    atomic_write_json(run.output("solve", "solutions", out), result)
    best = result["solutions"][0]
    atomic_write_json(out / "speedup_checks.json", checks)
    console.print(f"solve: predicted speedup {best['predicted_speedup']:.2f}x, "
                  f"objective {best['objective']:.4f} ({best['solver']}, {best['status']})"
                  + (f", kept for its validation KL {best['validation_kl']:.4f}" if "validation_kl" in best else ""))
    per_layer_runtime(out / "per_layer_runtime.png", layer_rows(costs, best["variants"]),
                      layer_rows(costs, model_variants(run.source)),
                      f"child vs parent on {run.target.name}, {run.scenario.describe()} ({costs['source']['kind']})")


def checks_speed(run: Run) -> bool:
    """Whether solve times its child against the parent (``--speedup-checks``): for ``--speedup`` on a CPU target,
    which is this machine (and a measured profile, as on this machine it is)."""
    s = run.settings
    return bool(s.speedup and s.speedup_checks and run.target.kind == "cpu")


def plan(run: Run) -> MemoryPlan | None:
    """The speed check's memory: the parent and a child (as large as the parent at most) whole, as they serve, and
    timed (``hwopt.memory_plan.report_plan``); None without speed checks. The candidates' distillation
    (``--select-tokens``) is not planned here: where it does not fit, solve keeps the MIP's child and says so
    (``hwopt.selection.select``)."""
    from hwopt.memory_plan import report_plan

    if not checks_speed(run):
        return None
    return report_plan(run.layerwise_parent, run.layerwise_parent, run.scenario, 1, run.settings.seq_len,
                       run.deployed, what="solve's speed check (parent and child whole, timed)",
                       remedy="give --speedup-checks 0 to solve by predicted costs alone, or more --max-memory")


def coupled_bld(run: Run, library: dict, costs: dict, out: Path) -> dict:
    """Decoupled search, coupled BLD of the pairs it chose, those pairs scored again: the library to solve."""
    from hwopt.bld import BLDSettings, build_coupled, coupled_subspace
    from hwopt.scoring import rescore_coupled
    from hwopt.solving import maximizes, solve

    s = run.settings
    decoupled = solve(library, costs, s.budgets, s.objective_key, s.solver, out / "decoupled_solutions.json",
                      maximizes(s.objective_key), s.coupled_bld, s.min_diversity, s.time_limit)
    decoupled_library = run.library(coupled=False)
    names = decoupled_library.variant_names
    parent_choice = [(names(i, "attention")[0], names(i, "ffn")[0]) for i in range(run.source.config.num_hidden_layers)]
    subspace = coupled_subspace([sol["variants"] for sol in decoupled["solutions"]], parent_choice)
    build_coupled(run.layerwise_parent, decoupled_library, subspace, run.split.train_batches(s.bld_tokens),
                  BLDSettings(tokens=s.bld_tokens, lr=s.bld_lr, seed=s.seed), run.output("solve", "coupled", out),
                  run.placement)
    rescored = rescore_coupled(run.layerwise_parent, run.library(solve_dir=out), library, subspace,
                               run.split.score_batches(s.score_tokens), run.metric_objects, costs, run.task)
    atomic_write_json(run.output("solve", "block_library", out), rescored)
    return rescored


INFO = PassInfo("solve", (*DATA, "runtime", "objective", "speedup", "memory", "throughput", "latency", "ttft",
                          "params", "solver", "num_solutions", "min_diversity", "time_limit", "coupled_bld",
                          "speedup_checks", "bld_tokens", "bld_lr", "score_tokens", "metrics", "task_data",
                          "select_tokens", "uptrain_lr", *PLACEMENT),
                check, call, plan=plan, reads=("score", "profile", "library"),
                outputs={"solutions": "solutions.json", "coupled": "coupled",  # coupled BLD's pairs, trained
                         "block_library": "block_library.json"},  # rescored with them
                # `solve --library`: the scenario its runtimes hold for; the memory coupled BLD, the speed checks and
                # the candidates may take (refused before the pass starts: it never changes what solve writes)
                also_reads=("scenario", "batch", "dtype", "max_memory"))
