"""The built-in ``scip`` solver: the Puzzle search as a mixed-integer program.

One binary ``x[layer, variant]`` per library entry, exactly one per layer;
every total is linear in the binaries, so budgets and the objective are
linear too. ``explain_infeasible`` in ``hwopt.problem`` reuses this solver on
sub-problems, so this is the one place the program is written down.
"""

from __future__ import annotations

import time

from pyscipopt import Model, quicksum

from hwopt.errors import HwoptError
from hwopt.hookspecs import hookimpl
from hwopt.problem import Problem, Solution

# pyscipopt's status names -> the ones hwopt reports
_STATUS = {"timelimit": "time_limit"}


def build_mip(problem: Problem) -> tuple[Model, dict[tuple[str, str], object]]:
    """The program for ``problem``, with its binaries by (layer, variant)."""
    model = Model("hwopt")
    model.hideOutput()
    x = {
        (layer, variant): model.addVar(f"x[{layer},{variant}]", vtype="B")
        for layer in problem.layers
        for variant in problem.variants[layer]
    }

    def total(key: str):
        return problem.offsets.get(key, 0.0) + quicksum(
            problem.value(layer, variant, key) * var for (layer, variant), var in x.items()
        )

    for layer in problem.layers:
        model.addCons(quicksum(x[layer, v] for v in problem.variants[layer]) == 1)
    for c in problem.constraints:
        if c.max is not None:
            model.addCons(total(c.key) <= c.max)
        if c.min is not None:
            model.addCons(total(c.key) >= c.min)
    for other in problem.exclude:
        # the binaries that repeat the excluded choice (a variant this layer lacks never does)
        same = [
            x[layer, other[layer]] for layer in problem.layers if (layer, other.get(layer)) in x
        ]
        model.addCons(quicksum(same) <= len(problem.layers) - problem.min_diversity)
    model.setObjective(total(problem.objective), "maximize" if problem.maximize else "minimize")
    return model, x


class ScipSolver:
    name = "scip"

    def solve(self, problem: Problem, time_limit_s: float = 60.0) -> Solution | None:
        """The best choice, or None when no choice meets the constraints.

        Stopped by the time limit with a choice in hand, it returns that choice
        with status "time_limit" and SCIP's gap; with none, it cannot tell
        infeasible from slow, and says so.
        """
        start = time.perf_counter()
        model, x = build_mip(problem)
        model.setParam("limits/time", time_limit_s)
        model.optimize()
        status = model.getStatus()
        if model.getNSols() == 0:
            if status in ("infeasible", "inforunbd"):
                return None
            raise HwoptError(
                f"scip found no solution within {time_limit_s:g} s (status {status}); "
                "raise the time limit"
            )
        best = model.getBestSol()
        # binaries come back as floats near 0 or 1: take the largest per layer
        choice = {
            layer: max(problem.variants[layer], key=lambda v: model.getSolVal(best, x[layer, v]))
            for layer in problem.layers
        }
        totals = problem.totals(choice)
        return Solution(
            choice=choice,
            objective=totals[problem.objective],
            totals=totals,
            solver=self.name,
            status=_STATUS.get(status, status),
            gap=model.getGap(),
            wall_s=time.perf_counter() - start,
        )


@hookimpl
def hwopt_register_solvers(register):
    register(ScipSolver())
