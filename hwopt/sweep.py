"""Pareto sweeps: the best objective at a series of budgets on one key.

``--sweep stats.runtime_ms=0.4:1.0:13`` solves at 13 budgets on the total of
``stats.runtime_ms``, evenly spaced from 40% to 100% of the reference
architecture's total: the parent, or per layer the largest variant when the
library flags no parent (``Problem.reference_choice``). The solver's model is
built once (``compile``, where the solver has it) and only that budget moves
between solves; going from tight to loose, each answer is a feasible start for
the next. The result is a table (printed, CSV, JSON) and a plot.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from hwopt.errors import HwoptError
from hwopt.pipeline import atomic_path
from hwopt.problem import CompiledProblem, Constraint, Problem, Solution, Solver
from hwopt.progress import console

_SPEC = re.compile(r"(?P<key>[^=]+)=(?P<start>[^:]+):(?P<stop>[^:]+):(?P<points>[0-9]+)")


@dataclass(frozen=True)
class SweepSpec:
    """Budgets on ``key`` at ``points`` fractions from ``start`` to ``stop`` of the reference's total."""

    key: str
    start: float
    stop: float
    points: int

    @classmethod
    def parse(cls, text: str) -> SweepSpec:
        """'stats.runtime_ms=0.4:1.0:13' -> a spec; one clear error for anything else."""
        match = _SPEC.fullmatch(text.strip())
        try:
            spec = match and cls(match["key"], float(match["start"]), float(match["stop"]), int(match["points"]))
        except ValueError:
            spec = None
        if spec is None or spec.points < 1 or min(spec.start, spec.stop) <= 0:
            raise HwoptError(
                f"--sweep takes KEY=START:STOP:POINTS with positive fractions, "
                f"such as stats.runtime_ms=0.4:1.0:13, not {text!r}"
            )
        return spec

    def fractions(self) -> np.ndarray:
        return np.linspace(self.start, self.stop, self.points)


@dataclass
class SweepPoint:
    fraction: float
    budget: float
    solution: Solution | None


@dataclass
class Sweep:
    key: str
    reference: str  # how the reference architecture was chosen
    reference_total: float
    points: list[SweepPoint]

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "reference": self.reference,
            "reference_total": self.reference_total,
            "points": [
                {"fraction": p.fraction, "budget": p.budget,
                 "solution": None if p.solution is None else p.solution.to_json()}
                for p in self.points
            ],
        }


def pareto_sweep(problem: Problem, solver: Solver, spec: SweepSpec, time_limit_s: float = 60.0) -> Sweep:
    """Solve ``problem`` once per budget of ``spec``; a point without a solution has ``solution`` None."""
    problem.require([spec.key])
    if any(c.key == spec.key for c in problem.constraints):
        raise HwoptError(f"--sweep {spec.key} is also bounded by another budget; drop one of them")
    reference = problem.reference_choice(spec.key)
    reference_total = problem.totals(reference, (spec.key,))[spec.key]
    fractions = spec.fractions().round(12)  # 0.7, not 0.7000000000000001, in the table
    budgets = fractions * reference_total
    index = len(problem.constraints)
    swept = dataclasses.replace(problem, constraints=[*problem.constraints, Constraint(spec.key, max=budgets[0])])
    model: CompiledProblem | None = solver.compile(swept) if hasattr(solver, "compile") else None
    points = []
    for fraction, budget in zip(fractions.tolist(), budgets.tolist()):
        bound = Constraint(spec.key, max=budget)
        if model is None:  # a plugin solver without compile: a fresh solve per budget
            solution = solver.solve(dataclasses.replace(swept, constraints=[*problem.constraints, bound]), time_limit_s)
        else:
            model.set_constraint(index, bound)
            solution = model.solve(time_limit_s)
        points.append(SweepPoint(fraction, budget, solution))
    how = "the parent" if problem.parent is not None else f"per layer the variant with the largest {spec.key}"
    return Sweep(spec.key, how, reference_total, points)


def _columns(problem: Problem, sweep: Sweep) -> list[str]:
    return list(dict.fromkeys([problem.objective, *(c.key for c in problem.constraints), sweep.key]))


def _rows(problem: Problem, sweep: Sweep, exact: bool) -> list[list]:
    """One row per point: fraction, budget, the objective and every constrained total, solver, status, gap, time."""
    rows = []
    for p in sweep.points:
        s = p.solution
        if s is None:
            rows.append([p.fraction, p.budget, *[None] * len(_columns(problem, sweep)), None,
                         "infeasible" if exact else "none found", None, None])
        else:
            gap = s.gap if math.isfinite(s.gap) else None
            rows.append([p.fraction, p.budget, *(s.totals[k] for k in _columns(problem, sweep)), s.solver,
                         s.status, gap, s.wall_s])
    return rows


def write_sweep(problem: Problem, sweep: Sweep, exact: bool, csv_path: Path, png_path: Path) -> None:
    """The sweep as a CSV table and a PNG plot of the objective against the budget."""
    header = ["fraction", "budget", *_columns(problem, sweep), "solver", "status", "gap", "wall_s"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in _rows(problem, sweep, exact))
    # imported here: matplotlib takes a while to load, and only a sweep needs it
    from matplotlib.figure import Figure

    solved = [p for p in sweep.points if p.solution is not None]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot([p.budget for p in solved], [p.solution.objective for p in solved], "o-")
    ax.set_xlabel(f"budget on {sweep.key} (reference total {sweep.reference_total:.6g})")
    ax.set_ylabel(f"{problem.objective} ({'maximised' if problem.maximize else 'minimised'})")
    solver = solved[0].solution.solver if solved else "no solution"
    ax.set_title(f"best {problem.objective} against the {sweep.key} budget ({solver})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def print_sweep(problem: Problem, sweep: Sweep, exact: bool) -> None:
    table = Table(title=f"Pareto sweep: budgets on {sweep.key}, fractions of {sweep.reference_total:.6g} "
                        f"({sweep.reference})")
    for name in ["fraction", "budget", *_columns(problem, sweep), "status", "time s"]:
        table.add_column(name, justify="left" if name == "status" else "right", overflow="fold")
    for row in _rows(problem, sweep, exact):
        fraction, budget, *totals, _solver, status, _gap, wall_s = row
        table.add_row(f"{fraction:.3g}", f"{budget:.6g}", *("-" if t is None else f"{t:.6g}" for t in totals),
                      status, "-" if wall_s is None else f"{wall_s:.3f}")
    console.print(table)
