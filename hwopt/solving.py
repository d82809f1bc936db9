"""The solve pass's work (``hwopt.passes.solve``): one block per layer, the best under the budgets.

Two ways in, one search:

- ``solve`` is what the pipeline's pass calls (``hwopt solve --workdir runs/x --speedup 2``):
  it reads the score pass's library and the profile's costs. Costs outside
  the layers (embeddings, head) are offsets, so budgets are on the whole model.
- ``solve_library`` takes any block library in the DESIGN format, ours or a
  published one (``hwopt solve --library block_library.json --max
  stats.memory_mib=80000``), and needs no other pass; it also runs Pareto sweeps.

Both turn the convenience budgets (``Budgets``: ``--speedup``, ``--memory``,
``--throughput``, ``--latency``, ``--ttft``, ``--params``) into constraints
on library keys, ask the solver for one or several diverse solutions, and
when no architecture meets the budgets, stop with what the library can reach.

A ``--speedup`` is predicted from the profile's per-block costs; when the
target is this machine, ``meet_measured_speedup`` times the chosen child
whole and solves again with a tighter budget while it measures short.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from hwopt.errors import HwoptError
from hwopt.model.config import BlockConfig
from hwopt.pipeline import atomic_write_json
from hwopt.plugins import block_types, metrics, solvers
from hwopt.problem import (
    Constraint,
    Problem,
    Solution,
    Solver,
    diverse_solutions,
    explain_infeasible,
    problem_from_library,
)
from hwopt.progress import console
from hwopt.search_space import Scenario
from hwopt.sweep import SweepSpec, pareto_sweep, print_sweep, write_sweep

RUNTIME, MEMORY, PARAMS = "stats.runtime_ms", "stats.memory_mib", "stats.num_params"
# time to first token; libraries profiled before it existed have only the prefill time
TTFT, PREFILL = "stats.ttft_ms", "stats.prefill_ms"
_UNITS = {"b": 2**-20, "kb": 1e3 / 2**20, "kib": 2**-10, "mb": 1e6 / 2**20, "mib": 1.0,
          "gb": 1e9 / 2**20, "gib": 2**10, "tb": 1e12 / 2**20, "tib": 2**20}
_COUNTS = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_NUMBER = r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*"


def parse_memory_mib(text: str) -> float:
    """'80GB', '512 MiB', '1.5GiB' -> MiB (a bare number is MiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    unit = (match.group(2) or "mib").lower() if match else None
    try:
        return float(match.group(1)) * _UNITS[unit]
    except (AttributeError, KeyError, ValueError):  # no match, an unknown unit, a number such as 1.2.3
        raise HwoptError(f"--memory takes a size such as 80GB, 512MiB or 1.5GiB, not {text!r}") from None


def parse_max_memory(text: str) -> int:
    """'8GiB', '512MiB', '16GB' -> bytes. Raises HwoptError for anything but a positive size."""
    try:
        nbytes = int(parse_memory_mib(text) * 2**20)
    except HwoptError:
        nbytes = 0
    if nbytes <= 0:
        raise HwoptError(f"--max-memory takes a positive size such as 8GiB or 512MiB, not {text!r}")
    return nbytes


def parse_count(text: str) -> float:
    """'50B', '135M', '7e9', '1.5k' -> a number (parameter counts)."""
    match = re.fullmatch(_NUMBER + r"([a-zA-Z]?)\s*", text, flags=re.IGNORECASE)
    suffix = match.group(2).lower() if match else None
    try:
        return float(match.group(1)) * _COUNTS[suffix]
    except (AttributeError, KeyError, ValueError):
        raise HwoptError(f"--params takes a count such as 50B, 135M or 7e9, not {text!r}") from None


def parse_max(text: str) -> Constraint:
    """'stats.memory_mib=80000' -> stats.memory_mib <= 80000."""
    key, _, value = text.partition("=")
    try:
        return Constraint(key.strip(), max=float(value))
    except ValueError:
        raise HwoptError(f"--max takes KEY=VALUE such as stats.memory_mib=80000, not {text!r}") from None


def parse_range(text: str) -> Constraint:
    """'stats.num_params=1e9:5e10' -> a (min, max) range; either side may be left out ('1e9:')."""
    key, _, bounds = text.partition("=")
    low, colon, high = bounds.partition(":")
    try:
        if not colon:
            raise ValueError
        return Constraint(key.strip(), min=float(low) if low.strip() else None,
                          max=float(high) if high.strip() else None)
    except ValueError:
        raise HwoptError(f"--range takes KEY=LOW:HIGH such as stats.memory_mib=40000:80000, not {text!r}") from None


@dataclass(frozen=True)
class Budgets:
    """The user's budgets in their own units, before they become constraints on library keys."""

    speedup: float | None = None
    memory: str | None = None
    throughput: float | None = None
    latency: float | None = None  # ms for the whole batch's generation: the runtime total
    ttft: float | None = None  # ms to the first token: the prefill
    params: str | None = None

    def __post_init__(self) -> None:
        """Check every budget at once, before any file is read."""
        for name in ("speedup", "throughput", "latency", "ttft"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise HwoptError(f"--{name} must be a positive number, not {value}")
        for name, text, parse in (("memory", self.memory, parse_memory_mib), ("params", self.params, parse_count)):
            if text is not None and not parse(text) > 0:
                raise HwoptError(f"--{name} must be more than 0, not {text!r}")

    def keys(self, ttft_key: str = TTFT) -> list[str]:
        """The library keys these budgets constrain."""
        wanted = {RUNTIME: (self.speedup, self.throughput, self.latency), MEMORY: (self.memory,),
                  ttft_key: (self.ttft,), PARAMS: (self.params,)}
        return [key for key, given in wanted.items() if any(v is not None for v in given)]

    def constraints(self, parent_totals: dict, scenario: Scenario | None, ttft_key: str = TTFT) -> list[Constraint]:
        """Whole-model constraints; ``parent_totals[RUNTIME]`` is what ``--speedup`` divides."""
        runtime_caps = []
        if self.speedup is not None:
            runtime_caps.append(parent_totals[RUNTIME] / self.speedup)
        if self.throughput is not None:
            if scenario is None:
                raise HwoptError("--throughput needs the workload the library was measured at: "
                                 "give --scenario INPUT/OUTPUT and --batch")
            runtime_caps.append(scenario.runtime_ms_for_throughput(self.throughput))
        if self.latency is not None:
            runtime_caps.append(self.latency)
        out = [Constraint(RUNTIME, max=min(runtime_caps))] if runtime_caps else []
        if self.memory is not None:
            out.append(Constraint(MEMORY, max=parse_memory_mib(self.memory)))
        if self.ttft is not None:
            out.append(Constraint(ttft_key, max=self.ttft))
        if self.params is not None:
            out.append(Constraint(PARAMS, max=parse_count(self.params)))
        return out


def maximizes(objective: str) -> bool:
    """Whether ``objective`` names a registered metric that is better when higher."""
    name = objective.removeprefix("metrics.")
    return name in metrics().names() and metrics().get(name).higher_is_better


def with_budgets(problem: Problem, budgets: Budgets, scenario: Scenario | None,
                 constraints: list[Constraint] = ()) -> Problem:
    """``problem`` under ``constraints`` and ``budgets``; ``--speedup`` divides the reference's runtime."""
    ttft_key = TTFT if problem.has(TTFT) else PREFILL
    keys = budgets.keys(ttft_key)
    problem.require([*keys, *(c.key for c in constraints)])
    parent_totals = problem.totals(problem.reference_choice(RUNTIME), (RUNTIME,)) if RUNTIME in keys else {}
    return dataclasses.replace(problem, constraints=[*constraints, *budgets.constraints(parent_totals, scenario,
                                                                                          ttft_key)])


def find_solutions(problem: Problem, solver: Solver, count: int = 1, min_diversity: int = 1,
                   time_limit_s: float = 60.0) -> list[Solution]:
    """Up to ``count`` diverse solutions, best first; raises with what the library reaches when there is none."""
    if count < 1 or min_diversity < 1:
        raise HwoptError("--num-solutions and --min-diversity must be at least 1")
    if time_limit_s <= 0:
        raise HwoptError("--time-limit must be positive")
    found = diverse_solutions(problem, solver, count, min_diversity, time_limit_s)
    if not found:
        raise _no_solution(problem, solver, time_limit_s)
    if len(found) < count:
        console.print(f"[yellow]only {len(found)} of {count} solutions meet the budgets while differing from "
                      f"each other in at least {min_diversity} layers[/yellow]")
    return found


def _no_solution(problem: Problem, solver: Solver, time_limit_s: float) -> HwoptError:
    """The error for budgets nothing meets: per budget, the best total reachable under the others.

    A heuristic finding nothing proves nothing, so the explanation comes from
    SCIP then, and says so when SCIP does find an architecture.
    """
    exact = solver if getattr(solver, "exact", True) else solvers().get("scip")
    if exact is not solver and (found := exact.solve(problem, time_limit_s)) is not None:
        return HwoptError(f"{solver.name} found no architecture within the budgets, but {exact.name} finds one "
                          f"({problem.objective} {found.objective:.6g}): {solver.name} is a heuristic, "
                          f"use --solver scip or highs")
    reasons = "; ".join(explain_infeasible(problem, exact, time_limit_s))
    speedup = ""
    if any(c.key == RUNTIME for c in problem.constraints):
        fastest = exact.solve(dataclasses.replace(problem, objective=RUNTIME, maximize=False, constraints=[]),
                              time_limit_s)
        reference = problem.totals(problem.reference_choice(RUNTIME), (RUNTIME,))[RUNTIME]
        whom = "the parent" if problem.parent is not None else "the largest blocks"
        if fastest is not None and fastest.objective > 0:
            speedup = f" (the fastest child in the library is {reference / fastest.objective:.2f}x {whom})"
    return HwoptError(f"no architecture in the library meets the budgets: {reasons}{speedup}")


def _summary(problem: Problem) -> dict:
    return {
        "objective": problem.objective,
        "maximize": problem.maximize,
        "constraints": [c.describe() for c in problem.constraints],
    }


def print_solutions(problem: Problem, solutions: list[Solution]) -> None:
    """One row per solution: the objective, every constrained total, solver, status, gap and time."""
    keys = list(dict.fromkeys(c.key for c in problem.constraints))
    table = Table(title=f"{'maximise' if problem.maximize else 'minimise'} {problem.objective}; "
                        + (", ".join(c.describe() for c in problem.constraints) or "no budgets"))
    for name in ["#", problem.objective, *keys, "solver", "status", "gap", "time s"]:
        table.add_column(name, justify="left" if name in ("solver", "status") else "right", overflow="fold")
    for i, s in enumerate(solutions):
        table.add_row(str(i), f"{s.objective:.6g}", *(f"{s.totals[k]:.6g}" for k in keys), s.solver, s.status,
                      f"{s.gap:.2g}" if math.isfinite(s.gap) else "-", f"{s.wall_s:.3f}")
    console.print(table)


def print_choice(problem: Problem, solution: Solution) -> None:
    """The chosen variant per layer, with its share of the objective and of each constrained key; a last row
    holds the costs outside the layers (``Problem.offsets``) where the budgets count them, so the rows add up to
    the totals."""
    keys = list(dict.fromkeys([problem.objective, *(c.key for c in problem.constraints)]))
    table = Table(title="solution 0, per layer")
    for name in ["layer", "variant", *keys]:
        table.add_column(name, justify="left" if name in ("layer", "variant") else "right", overflow="fold")
    for layer in problem.layers:
        variant = solution.choice[layer]
        table.add_row(layer, variant, *(f"{problem.value(layer, variant, k):.4g}" for k in keys))
    if any(problem.offsets.get(k) for k in keys):
        table.add_section()
        table.add_row("outside the layers", "embeddings, LM head",
                      *(f"{problem.offsets[k]:.4g}" if k in problem.offsets else "" for k in keys))
    console.print(table)


def outside_offsets(costs: dict) -> dict[str, float]:
    """The profile's costs outside the layers (embeddings, final norm, LM head; ``costs.json``'s
    ``outside_layers``) as offsets on library keys (``stats.runtime_ms``: ms), so budgets hold for the whole model."""
    return {f"stats.{k}": float(v) for k, v in costs["outside_layers"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def solve(library: dict, costs: dict, budgets: Budgets, objective: str, solver_name: str, out_path: Path,
          maximize: bool = False, num_solutions: int = 1, min_diversity: int = 1,
          time_limit_s: float = 60.0) -> dict:
    """The pipeline's pass: write ``solutions.json``, each solution with totals next to the parent's.

    Solution 0 is the best; it is what uptrain assembles.
    """
    solver = solvers().get(solver_name)
    scenario = Scenario.from_json(costs["scenario"])
    unconstrained = library_problem(library, costs, objective, maximize)
    problem = with_budgets(unconstrained, budgets, scenario)
    solutions = find_solutions(problem, solver, num_solutions, min_diversity, time_limit_s)
    parent_totals = unconstrained.totals(unconstrained.parent, (RUNTIME, MEMORY))
    result = {
        **_summary(problem),
        "scenario": scenario.to_json(),
        "parent": {"totals": parent_totals},
        "solutions": [solution_entry(library, problem, parent_totals, solution) for solution in solutions],
    }
    atomic_write_json(out_path, result)
    print_solutions(problem, solutions)
    return result


def library_problem(library: dict, costs: dict, objective: str, maximize: bool = False) -> Problem:
    """The library's problem with no budget, the costs outside the layers as offsets (``outside_offsets``).

    Raises:
        HwoptError: the library flags no parent variant.
    """
    problem = problem_from_library(library, objective, [], maximize, offsets=outside_offsets(costs))
    if problem.parent is None:
        raise HwoptError("the score pass's block library flags no parent variant; rerun `hwopt score`")
    return problem


def solution_entry(library: dict, problem: Problem, parent_totals: dict[str, float], solution: Solution) -> dict:
    """One solution as ``solutions.json`` holds it: the solver's answer, its totals (runtime and memory
    included), the predicted speedup over ``parent_totals``, and its blocks and variants layer by layer."""
    totals = problem.totals(solution.choice, (RUNTIME, MEMORY))
    entries = [library[layer][solution.choice[layer]] for layer in problem.layers]
    return {
        **solution.to_json(),
        "totals": totals,
        "predicted_speedup": parent_totals[RUNTIME] / totals[RUNTIME],
        "blocks": [e["block_config"] for e in entries],
        "variants": [[e[k] for k in ("attention", "ffn")] for e in entries],
        "spans": [i for i, e in enumerate(entries) if e.get("span", 1) == 2],  # two-layer blocks' layers
    }


def solution_blocks(solution: dict, config, where: str) -> list[BlockConfig]:
    """The ``"blocks"`` ``solution_entry`` wrote, read back as ``BlockConfig``s of ``config``'s model.

    Raises:
        HwoptError: a block that does not read as one, named by ``where`` and its layer.
    """
    return [BlockConfig.from_json(block, config, block_types(), f"{where}: layer {i}")
            for i, block in enumerate(solution["blocks"])]


def meet_measured_speedup(solve_at: Callable[[float], dict], measure: Callable[[dict], dict], speedup: float,
                          checks: int) -> tuple[dict, list[dict]]:
    """A solution whose child measures at least ``speedup`` times the parent's speed, and the checks on the way.

    ``solve_at(budget)`` solves at a predicted speedup ``budget`` (``solve``'s
    result); ``measure(result)`` times its solution 0 against the parent
    (``hwopt.evaluate.measured_speedup``: ``measured_speedup`` and its relative
    standard ``error``). The first solve is at ``speedup``. While a child
    measures short, the budget is raised by the shortfall, ``budget * speedup
    / measured`` (unless the check was ``disturbed`` by other processes: then
    that child is kept, with a warning, since a loaded machine would
    over-compress it); at most ``checks`` children are solved and measured.
    A child must measure ``speedup`` itself, not within its error of it: the
    report times it again, and a child kept at 1.47x ± 4% for 1.5x measured
    1.47x there too. Nor is the budget raised by the error on top: a child
    solved for 1.55x that way measured 1.55x to 1.66x, and lost to its
    perplexity what it gained in speed.
    Returns the first child that meets ``speedup``;
    when none does, or a raised budget has no solution, the one that measured
    fastest, with a warning. Every child returned was measured. Each check:
    ``{"budget_speedup", "predicted_speedup", "measured_speedup", "error", "measured_ms"}``.

    Raises:
        HwoptError: the first solve has no solution (``checks`` is at least 1).
    """
    budget, tried = speedup, []
    while len(tried) < checks:
        try:
            result = solve_at(budget)
        except HwoptError as exc:
            if not tried:
                raise
            console.print(f"[yellow]solve: no child is predicted {budget:.2f}x ({exc})[/yellow]", soft_wrap=True)
            break
        check = {"budget_speedup": budget, "predicted_speedup": result["solutions"][0]["predicted_speedup"],
                 **measure(result)}
        tried.append((result, check))
        console.print(f"solve: the child measures {check['measured_speedup']:.2f}x here (± {check['error']:.1%}; "
                      f"predicted {check['predicted_speedup']:.2f}x)")
        if check["measured_speedup"] >= speedup:
            return result, [c for _, c in tried]
        if check.get("disturbed"):  # other processes' load, not the child, may have made it short: no raise on that
            console.print(f"[yellow]solve: other processes kept {check['others']:.1f} cores busy while the child was "
                          f"timed, so its {check['measured_speedup']:.2f}x is not trusted and the budget is not "
                          "raised; run `hwopt solve` again on a quiet machine to check it[/yellow]", soft_wrap=True)
            return result, [c for _, c in tried]
        budget *= speedup / check["measured_speedup"]
    result, check = max(tried, key=lambda rc: rc[1]["measured_speedup"])
    console.print(f"[yellow]solve: no child measured {speedup:.2f}x in {len(tried)} tries; keeping the fastest, "
                  f"{check['measured_speedup']:.2f}x (predicted {check['predicted_speedup']:.2f}x)[/yellow]",
                  soft_wrap=True)
    return result, [c for _, c in tried]


def read_library(path: Path) -> dict:
    """A block library file, parsed; anything unreadable is one error line naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HwoptError(f"block library {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HwoptError(f"cannot read block library {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise HwoptError(f"block library {path} is not JSON: {exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno}") from None


def solve_library(path: Path, *, objective: str, maximize: bool = False, constraints: list[Constraint] = (),
                  budgets: Budgets = Budgets(), scenario: Scenario | None = None, solver_name: str = "scip",
                  num_solutions: int = 1, min_diversity: int = 1, time_limit_s: float = 60.0,
                  sweep: SweepSpec | None = None, json_path: Path | None = None,
                  outside: tuple[str, dict[str, float]] | None = None) -> dict:
    """Solve any block library file, without a run directory; print the result, and write it to ``json_path``.

    ``outside``: where costs outside the layers were found, and those costs (``outside_offsets``), so that
    budgets such as ``--speedup`` are of the whole model as in a run; without them they are of the layers alone
    (said when there are budgets).

    With ``sweep``, it solves at each of the sweep's budgets instead, and writes
    the sweep's table and plot next to ``json_path`` (``<name>.sweep.csv``,
    ``<name>.sweep.png``).
    """
    if sweep is not None and json_path is None:
        raise HwoptError("--sweep needs --json PATH: the sweep's table and plot are written next to it")
    if sweep is not None and num_solutions != 1:
        raise HwoptError("--sweep finds one solution per budget: drop --num-solutions")
    solver = solvers().get(solver_name)
    unconstrained = problem_from_library(read_library(path), objective, [], maximize,
                                         offsets=outside[1] if outside else None)
    problem = with_budgets(unconstrained, budgets, scenario, list(constraints))
    if budgets.keys():
        console.print(f"budgets are of the whole model: the costs outside the layers are from {outside[0]}" if outside
                      else f"{path} carries no costs outside its layers (embeddings, LM head): budgets are of the "
                           "layers alone", style="dim", soft_wrap=True)
    result = {"library": str(path), **_summary(problem)}
    if sweep is None:
        solutions = find_solutions(problem, solver, num_solutions, min_diversity, time_limit_s)
        print_choice(problem, solutions[0])
        print_solutions(problem, solutions)
        result["solutions"] = [s.to_json() for s in solutions]
    else:
        exact = getattr(solver, "exact", True)
        swept = pareto_sweep(problem, solver, sweep, time_limit_s)
        print_sweep(problem, swept, exact)
        write_sweep(problem, swept, exact, json_path.with_name(f"{json_path.stem}.sweep.csv"),
                    json_path.with_name(f"{json_path.stem}.sweep.png"))
        result["sweep"] = swept.to_json()
    if json_path is not None:
        atomic_write_json(json_path, result)
    return result
