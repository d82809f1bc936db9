"""The search problem of the solve pass, independent of any solver.

A problem is: for every layer pick exactly one variant, so that the summed
objective (e.g. ``metrics.kl_div``) is best while summed costs stay within
budgets (e.g. ``stats.runtime_ms <= 12.5``). Keys are dotted paths into the
block-library entries (see DESIGN.md, "Block library").

A solver (registered through ``hwopt_register_solvers``) turns a ``Problem``
into a ``Solution``; ``explain_infeasible`` tells the user which budget to
relax, and by how much, when there is none.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hwopt.errors import HwoptError

# A total may exceed its bound by this much, relative to max(|total|, |bound|, 1):
# the feasibility tolerance SCIP accepts, so that what a solver returns passes
# ``Problem.is_feasible``.
FEASIBILITY_TOLERANCE = 1e-6

_LAYER_NAME = re.compile(r"layer_(0|[1-9][0-9]*)")


def _fmt(x: float) -> str:
    """A number as users read it in messages: 6 significant digits, no trailing zeros."""
    return f"{x:.6g}"


@dataclass(frozen=True)
class Constraint:
    """A budget on the total of one key over all layers: a maximum, a minimum or both."""

    key: str
    max: float | None = None
    min: float | None = None

    def __post_init__(self) -> None:
        if self.max is None and self.min is None:
            raise HwoptError(f"constraint on {self.key} needs a max, a min or both")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise HwoptError(f"constraint {self.describe()} is empty: min is above max")

    def describe(self) -> str:
        if self.min is None:
            return f"{self.key} <= {_fmt(self.max)}"
        if self.max is None:
            return f"{self.key} >= {_fmt(self.min)}"
        return f"{_fmt(self.min)} <= {self.key} <= {_fmt(self.max)}"

    def bounds(self) -> list[Constraint]:
        """This constraint as one-sided constraints, so each side can be relaxed alone."""
        if self.min is None or self.max is None:
            return [self]
        return [Constraint(self.key, max=self.max), Constraint(self.key, min=self.min)]


def _within(total: float, bound: float) -> bool:
    """total <= bound, up to FEASIBILITY_TOLERANCE."""
    return total - bound <= FEASIBILITY_TOLERANCE * max(abs(total), abs(bound), 1.0)


@dataclass
class Problem:
    """Pick one variant per layer; values[layer][variant][key] is that entry's number for key."""

    layers: list[str]
    variants: dict[str, list[str]]
    values: dict[str, dict[str, dict[str, float]]]
    objective: str
    maximize: bool = False
    constraints: list[Constraint] = field(default_factory=list)
    # cost outside the layers (e.g. the LM head), added to a key's total
    offsets: dict[str, float] = field(default_factory=dict)
    # earlier solutions the answer must differ from in at least min_diversity layers
    exclude: list[dict[str, str]] = field(default_factory=list)
    min_diversity: int = 1

    def value(self, layer: str, variant: str, key: str) -> float:
        return self.values[layer][variant][key]

    def totals(self, choice: dict[str, str], extra_keys: tuple[str, ...] = ()) -> dict[str, float]:
        """The objective, every constrained key and ``extra_keys``, summed over layers, offsets included."""
        keys = dict.fromkeys([self.objective, *(c.key for c in self.constraints), *extra_keys])
        return {
            key: self.offsets.get(key, 0.0)
            + sum(self.value(layer, choice[layer], key) for layer in self.layers)
            for key in keys
        }

    def is_feasible(self, choice: dict[str, str]) -> bool:
        """Whether the choice meets every constraint and differs enough from each excluded one."""
        totals = self.totals(choice)
        for c in self.constraints:
            if c.max is not None and not _within(totals[c.key], c.max):
                return False
            if c.min is not None and not _within(c.min, totals[c.key]):
                return False
        return all(
            sum(choice[layer] != other.get(layer) for layer in self.layers) >= self.min_diversity
            for other in self.exclude
        )


@dataclass
class Solution:
    """A solver's answer; totals hold the objective and every constrained key, offsets included."""

    choice: dict[str, str]
    objective: float
    totals: dict[str, float]
    solver: str
    status: str
    gap: float
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        """The fields as plain JSON; an unknown gap (infinite) becomes null."""
        data = dataclasses.asdict(self)
        if not math.isfinite(self.gap):
            data["gap"] = None
        return data


class Solver(Protocol):
    """What ``hwopt_register_solvers`` registers."""

    name: str

    def solve(self, problem: Problem, time_limit_s: float = 60.0) -> Solution | None: ...


def _flatten(entry: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a nested dict, by dotted path ("stats.runtime_ms")."""
    flat: dict[str, float] = {}
    for name, value in entry.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def _layer_index(name: Any) -> int:
    match = _LAYER_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise HwoptError(f"block library key {name!r} is not of the form layer_<n>")
    return int(match.group(1))


def problem_from_library(
    library: dict,
    objective: str,
    constraints: Iterable[Constraint],
    maximize: bool = False,
    offsets: dict[str, float] | None = None,
) -> Problem:
    """Build a problem from a parsed block library, checking every key it uses.

    Errors name the first offending layer, variant and key, so that a user can
    find it in a library of thousands of entries.
    """
    if not isinstance(library, dict) or not library:
        raise HwoptError("block library must be a non-empty JSON object of layer_<n> entries")
    constraints = list(constraints)
    layers = sorted(library, key=_layer_index)
    used_keys = list(dict.fromkeys([objective, *(c.key for c in constraints)]))

    variants: dict[str, list[str]] = {}
    values: dict[str, dict[str, dict[str, float]]] = {}
    for layer in layers:
        entries = library[layer]
        if not isinstance(entries, dict) or not entries:
            raise HwoptError(f"block library {layer} has no variants")
        variants[layer] = list(entries)
        values[layer] = {}
        for variant, entry in entries.items():
            if not isinstance(entry, dict):
                raise HwoptError(
                    f"block library {layer} variant {variant!r} is not an object "
                    f"(got {type(entry).__name__})"
                )
            flat = _flatten(entry)
            for key in used_keys:
                if key not in flat or not math.isfinite(flat[key]):
                    known = ", ".join(sorted(flat)) or "none"
                    raise HwoptError(
                        f"block library {layer} variant {variant!r}: {key} is missing or "
                        f"not a finite number (numeric keys there: {known})"
                    )
            values[layer][variant] = flat

    return Problem(
        layers=layers,
        variants=variants,
        values=values,
        objective=objective,
        maximize=maximize,
        constraints=constraints,
        offsets=dict(offsets or {}),
    )


def explain_infeasible(
    problem: Problem, solver: Solver | None = None, time_limit_s: float = 60.0
) -> list[str]:
    """One line per budget: the best total reachable under all the other budgets.

    Each side of a range counts as its own budget. For ``key <= max`` the line
    gives the lowest total reachable, for ``key >= min`` the highest, and how
    far that is from the budget, so the user knows what to relax and by how
    much. ``solver`` defaults to the built-in SCIP one.
    """
    if solver is None:
        # imported here because the solver module imports this one
        from hwopt.builtin.solvers import ScipSolver

        solver = ScipSolver()

    lines = []
    if problem.exclude:
        alone = dataclasses.replace(problem, constraints=[])
        if solver.solve(alone, time_limit_s) is None:
            lines.append(
                f"no combination differs from all {len(problem.exclude)} excluded solutions "
                f"in at least {problem.min_diversity} layers"
            )

    bounds = [b for c in problem.constraints for b in c.bounds()]
    for i, bound in enumerate(bounds):
        minimize = bound.max is not None
        sub = dataclasses.replace(
            problem,
            objective=bound.key,
            maximize=not minimize,
            constraints=bounds[:i] + bounds[i + 1 :],
        )
        best = solver.solve(sub, time_limit_s)
        head = bound.describe()
        if best is None:
            lines.append(
                f"{head}: no combination meets the other constraints, "
                "so relaxing this one alone does not help"
            )
            continue
        if minimize:
            word, limit, excess = "lowest", bound.max, best.objective - bound.max
        else:
            word, limit, excess = "highest", bound.min, bound.min - best.objective
        line = f"{head}: the {word} reachable under the other constraints is {_fmt(best.objective)}"
        if excess <= FEASIBILITY_TOLERANCE * max(abs(limit), 1.0):
            line += " (met)"
        else:
            share = f", {100 * excess / abs(limit):.3g}%" if limit else ""
            line += f" (relax by {_fmt(excess)}{share})"
        if best.status != "optimal":
            line += f" [solver stopped early: {best.status}]"
        lines.append(line)
    return lines
