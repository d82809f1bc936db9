"""The built-in solvers: ``scip`` (the default), ``highs``, and the ``greedy`` baseline.

All three start from ``Problem.linear_form()`` (see ``hwopt.problem.LinearForm``),
where the program is written down once: one binary per (layer, variant), exactly
one per layer, a linear row per budget and per excluded solution. Each backend
only translates those arrays into its own model. ``compile`` keeps that model,
so a Pareto sweep moves one budget and solves again without rebuilding it.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from hwopt.errors import HwoptError
from hwopt.hookspecs import hookimpl
from hwopt.problem import Constraint, LinearForm, Problem, Solution

# pyscipopt's and scipy's status names -> the ones hwopt reports
_SCIP_STATUS = {"timelimit": "time_limit"}
_HIGHS_STATUS = {0: "optimal", 1: "time_limit"}
_HIGHS_INFEASIBLE = 2
# scaled violation below which greedy counts a choice as within the budgets
_TOLERANCE = 1e-9


def _no_time_left(solver: str, time_limit_s: float, status: object) -> HwoptError:
    return HwoptError(
        f"{solver} found no solution within {time_limit_s:g} s (status {status}); raise the time limit"
    )


class _Compiled:
    """What every compiled model keeps: the problem, its form, and the bounds its rows have now."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.form = problem.linear_form()
        self.lower, self.upper = self.form.lower.copy(), self.form.upper.copy()

    def set_constraint(self, index: int, constraint: Constraint) -> None:
        self.lower[index], self.upper[index] = self.form.bounds(index, constraint)


class ScipModel(_Compiled):
    """The program in SCIP: objective coefficients on the binaries, a set-partitioning row per layer."""

    def __init__(self, problem: Problem):
        import pyscipopt  # here, not with the module: listing the solvers (hwopt plugins, targets) needs none of it

        super().__init__(problem)
        form = self.form
        self.model = model = pyscipopt.Model("hwopt")
        model.hideOutput()
        self.x = [model.addVar(vtype="B", obj=c) for c in form.cost.tolist()]
        for a, b in zip(form.starts[:-1], form.starts[1:]):
            model.addCons(pyscipopt.quicksum(self.x[a:b]) == 1)
        self.rows = [
            model.addCons(pyscipopt.ExprCons(self._linear(row), lhs=_finite(lower), rhs=_finite(upper)))
            for row, lower, upper in zip(form.rows, form.lower, form.upper)
        ]
        if form.maximize:
            model.setMaximize()
        # Measured on benchmarks/solver.py's libraries, each setting faster with the same optima: the LP
        # relaxation of one-variant-per-layer under a few budgets is tight already, so cutting planes rarely
        # pay; light heuristics suffice once greedy's answer is the first incumbent; and plain pseudo-cost
        # branching skips the strong branching that dominates SCIP's default on these small trees.
        model.setSeparating(pyscipopt.SCIP_PARAMSETTING.OFF)
        model.setHeuristics(pyscipopt.SCIP_PARAMSETTING.FAST)
        model.setIntParam("branching/pscost/priority", 1_000_000)
        self.previous: np.ndarray | None = None  # the entries of the last answer

    def _linear(self, row: np.ndarray):
        from pyscipopt import quicksum

        return quicksum(coef * self.x[j] for j, coef in zip(np.flatnonzero(row).tolist(), row[row != 0].tolist()))

    def set_constraint(self, index: int, constraint: Constraint) -> None:
        super().set_constraint(index, constraint)
        self.model.freeTransform()  # bounds change on the original problem, not SCIP's presolved copy
        self.model.chgLhs(self.rows[index], _finite(self.lower[index]))
        self.model.chgRhs(self.rows[index], _finite(self.upper[index]))

    def _start(self) -> np.ndarray | None:
        """A choice to offer first: the last answer if it still fits (a sweep loosening a budget), else greedy's."""
        if self.previous is not None:
            totals = self.form.rows[:, self.previous].sum(axis=1, keepdims=True)
            if violation(totals, self.lower, self.upper)[0] <= _TOLERANCE:
                return self.previous
        return greedy(self.form, self.lower, self.upper)

    def solve(self, time_limit_s: float = 60.0) -> Solution | None:
        """The best choice, or None when there is none.

        Stopped by the time limit with a choice in hand, it returns that choice
        with status "time_limit" and SCIP's gap; with none, it cannot tell
        infeasible from slow, and says so. A feasible start (``_start``)
        gives SCIP a good incumbent before its own search begins.
        """
        begin = time.perf_counter()
        model = self.model
        model.freeTransform()
        start = self._start()
        if start is not None:
            sol = model.createSol()
            for j in start.tolist():
                model.setSolVal(sol, self.x[j], 1.0)
            model.addSol(sol)
        model.setParam("limits/time", time_limit_s)
        model.optimize()
        status = model.getStatus()
        if model.getNSols() == 0:
            if status in ("infeasible", "inforunbd"):
                return None
            raise _no_time_left("scip", time_limit_s, status)
        best = model.getBestSol()
        x = np.array([model.getSolVal(best, v) for v in self.x])
        self.previous = np.flatnonzero(x > 0.5)
        gap = model.getGap() if model.getGap() < model.infinity() else math.inf  # no bound yet: unknown
        return self.problem.solution(
            self.form.choice(x), "scip", _SCIP_STATUS.get(status, status), gap, time.perf_counter() - begin
        )


def _finite(bound: float) -> float | None:
    """A bound as pyscipopt takes it: None for none."""
    return float(bound) if math.isfinite(bound) else None


class HighsModel(_Compiled):
    """The program in HiGHS (scipy.optimize.milp): one sparse matrix, the layers' rows first, built once.

    scipy is imported here, not with the module: it takes longer to import than a whole solve with SCIP.
    """

    def __init__(self, problem: Problem):
        from scipy import sparse

        super().__init__(problem)
        form = self.form
        self.n_layers, n = len(form.starts) - 1, len(form.entries)
        membership = sparse.csr_array((np.ones(n), (form.layer_of, np.arange(n))), shape=(self.n_layers, n))
        self.matrix = sparse.vstack([membership, sparse.csr_array(form.rows)], format="csr")
        self.cost = -form.cost if form.maximize else form.cost

    def solve(self, time_limit_s: float = 60.0) -> Solution | None:
        """As ``ScipModel.solve``, with HiGHS's gap; no start is offered (scipy's milp takes none)."""
        from scipy.optimize import Bounds, LinearConstraint, milp

        begin = time.perf_counter()
        one = np.ones(self.n_layers)
        result = milp(
            self.cost,
            integrality=np.ones_like(self.cost),
            bounds=Bounds(0, 1),
            constraints=LinearConstraint(self.matrix, np.concatenate([one, self.lower]),
                                         np.concatenate([one, self.upper])),
            options={"time_limit": time_limit_s, "mip_rel_gap": 0.0},
        )
        if result.x is None:
            if result.status == _HIGHS_INFEASIBLE:
                return None
            raise _no_time_left("highs", time_limit_s, result.message)
        return self.problem.solution(
            self.form.choice(result.x),
            "highs",
            _HIGHS_STATUS.get(result.status, result.message),
            result.mip_gap,
            time.perf_counter() - begin,
        )


def greedy(form: LinearForm, lower: np.ndarray, upper: np.ndarray) -> np.ndarray | None:
    """Budget-constrained greedy search, the baseline the Puzzle paper compares its MIP with (Table 11).

    It starts from each layer's best-objective entry. While a row is outside
    its bounds, it makes the one swap (a layer to another of its entries) that
    removes the most violation per unit of objective lost, a swap that loses
    nothing first; violation is summed over rows in the scaled units of
    ``LinearForm``. It stops as soon as every row is within bounds, without
    looking for a better feasible choice, and returns the chosen entries; or
    None when no swap reduces the violation, although a choice may still exist.
    """
    loss = -form.cost if form.maximize else form.cost  # smaller is better
    layer_of = form.layer_of
    chosen = np.array([a + int(np.argmin(loss[a:b])) for a, b in zip(form.starts[:-1], form.starts[1:])])
    totals = form.rows[:, chosen].sum(axis=1, keepdims=True)
    current_violation = violation(totals, lower, upper)[0]
    while current_violation > _TOLERANCE:
        current = chosen[layer_of]  # for every candidate entry, the entry its layer has now
        swapped = totals + form.rows - form.rows[:, current]
        removed = current_violation - violation(swapped, lower, upper)
        lost = loss - loss[current]
        useful = removed > _TOLERANCE
        if not useful.any():
            return None
        free = useful & (lost <= 0)
        if free.any():
            j = int(np.argmax(np.where(free, removed, -np.inf)))
        else:
            j = int(np.argmax(np.where(useful, removed / np.maximum(lost, 1e-300), -np.inf)))
        chosen[layer_of[j]] = j
        totals = form.rows[:, chosen].sum(axis=1, keepdims=True)
        current_violation = violation(totals, lower, upper)[0]
    return chosen


def violation(totals: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Per column of ``totals`` (rows x candidates), how far it is outside the bounds, summed over rows."""
    return (np.maximum(totals - upper[:, None], 0) + np.maximum(lower[:, None] - totals, 0)).sum(axis=0)


class GreedyModel(_Compiled):
    """``greedy`` on a problem's form. It has no gap, and takes milliseconds, so it ignores the time limit."""

    def solve(self, time_limit_s: float = 60.0) -> Solution | None:
        begin = time.perf_counter()
        chosen = greedy(self.form, self.lower, self.upper)
        if chosen is None:
            return None
        x = np.zeros(len(self.form.entries))
        x[chosen] = 1.0
        return self.problem.solution(self.form.choice(x), "greedy", "heuristic", math.inf,
                                     time.perf_counter() - begin)


class _Solver:
    """A solver that builds its model from the problem once (``compile``), then solves it."""

    name: str
    exact = True

    def solve(self, problem: Problem, time_limit_s: float = 60.0) -> Solution | None:
        """The best choice, or None when there is none; ``wall_s`` includes building the model."""
        start = time.perf_counter()
        solution = self.compile(problem).solve(time_limit_s)
        if solution is None:
            return None
        return dataclasses.replace(solution, wall_s=time.perf_counter() - start)


class ScipSolver(_Solver):
    name = "scip"

    def compile(self, problem: Problem) -> ScipModel:
        return ScipModel(problem)


class HighsSolver(_Solver):
    name = "highs"

    def compile(self, problem: Problem) -> HighsModel:
        return HighsModel(problem)


class GreedySolver(_Solver):
    name = "greedy"
    exact = False

    def compile(self, problem: Problem) -> GreedyModel:
        return GreedyModel(problem)


@hookimpl
def hwopt_register_solvers(register):
    register(ScipSolver())
    register(HighsSolver())
    register(GreedySolver())
