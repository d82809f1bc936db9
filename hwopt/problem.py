"""The search problem of the solve pass, independent of any solver.

A problem is: for every layer pick exactly one variant, so that the summed
objective (e.g. ``metrics.kl_div``) is best while summed costs stay within
budgets (e.g. ``stats.runtime_ms <= 12.5``). Keys are dotted paths into the
block-library entries (see DESIGN.md, "Block library").

A library may hold blocks that replace two consecutive parent layers (the
Puzzle paper's search space): such an entry of layer i says ``"span": 2``, and
layer i + 1 then has one entry flagged ``"spanned": true`` (the no-op the
block leaves there, costing nothing of its own). A ``Link`` ties them: layer
i + 1 takes its spanned entry exactly when layer i takes a two-layer block, so
every parent layer is covered exactly once (a set partition of the layers).

A solver (registered through ``hwopt_register_solvers``) turns a ``Problem``
into a ``Solution``. ``LinearForm`` is the problem as arrays, the one statement
of the program that the built-in solvers translate; ``diverse_solutions``
asks a solver for several answers that differ from each other, and
``explain_infeasible`` tells the user which budget to relax, and by how much,
when there is no answer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

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
        if not all(math.isfinite(b) for b in (self.max, self.min) if b is not None):
            raise HwoptError(f"constraint on {self.key}: its bounds must be finite numbers, not {self.min}:{self.max} "
                             "(leave a side out for no bound)")
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


@dataclass(frozen=True)
class Link:
    """Layer ``next_layer`` takes ``spanned`` exactly when ``layer`` takes one of ``spanning`` (two-layer blocks)."""

    layer: str
    spanning: tuple[str, ...]
    next_layer: str
    spanned: str

    def holds(self, choice: dict[str, str]) -> bool:
        return (choice[self.layer] in self.spanning) == (choice[self.next_layer] == self.spanned)


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
    # the variant flagged "parent": true in each layer, when the library flags them
    parent: dict[str, str] | None = None
    # two-layer blocks and the spanned entries they leave in the next layer
    links: list[Link] = field(default_factory=list)

    def value(self, layer: str, variant: str, key: str) -> float:
        return self.values[layer][variant][key]

    def has(self, key: str) -> bool:
        """Whether every entry has ``key`` as a finite number."""
        return all(
            math.isfinite(flat.get(key, math.nan)) for layer in self.layers for flat in self.values[layer].values()
        )

    def require(self, keys: Iterable[str]) -> None:
        """Raise unless every entry has each key as a finite number, naming the first entry that lacks one."""
        keys = list(keys)
        for layer in self.layers:
            for variant, flat in self.values[layer].items():
                for key in keys:
                    if not math.isfinite(flat.get(key, math.nan)):
                        known = ", ".join(sorted(flat)) or "none"
                        raise HwoptError(
                            f"block library {layer} variant {variant!r}: {key} is missing or "
                            f"not a finite number (numeric keys there: {known})"
                        )

    def reference_choice(self, key: str) -> dict[str, str]:
        """The architecture budgets are fractions of: the parent, or per layer the variant largest in ``key``.

        Published libraries (NVIDIA's Puzzle demo) do not flag the parent; its
        blocks are the largest ones, so the largest per layer stands in for it.
        """
        if self.parent is not None:
            return self.parent
        return {
            layer: max(self.variants[layer], key=lambda v: self.value(layer, v, key))
            for layer in self.layers
        }

    def solution(
        self, choice: dict[str, str], solver: str, status: str, gap: float, wall_s: float
    ) -> Solution:
        """A solver's choice with its totals recomputed from the library, not taken from the solver."""
        totals = self.totals(choice)
        return Solution(choice, totals[self.objective], totals, solver, status, gap, wall_s)

    def linear_form(self) -> LinearForm:
        return LinearForm.of(self)

    def totals(self, choice: dict[str, str], extra_keys: tuple[str, ...] = ()) -> dict[str, float]:
        """The objective, every constrained key and ``extra_keys``, summed over layers, offsets included."""
        keys = dict.fromkeys([self.objective, *(c.key for c in self.constraints), *extra_keys])
        return {
            key: self.offsets.get(key, 0.0)
            + sum(self.value(layer, choice[layer], key) for layer in self.layers)
            for key in keys
        }

    def is_feasible(self, choice: dict[str, str]) -> bool:
        """Whether the choice covers every layer once, meets every constraint and differs enough from each
        excluded one."""
        if not all(link.holds(choice) for link in self.links):
            return False
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
    """What ``hwopt_register_solvers`` registers.

    ``solve`` returns None when it found no choice that meets the constraints;
    a solver with ``exact = True`` (the default for one without the attribute)
    has then proved that there is none. A solver may also offer
    ``compile(problem) -> CompiledProblem``, so that a Pareto sweep builds its
    model once and only moves one budget between solves.
    """

    name: str
    exact: bool

    def solve(self, problem: Problem, time_limit_s: float = 60.0) -> Solution | None: ...


class CompiledProblem(Protocol):
    """A problem built into a solver's own model, to be solved under changing budgets."""

    def set_constraint(self, index: int, constraint: Constraint) -> None:
        """Replace ``problem.constraints[index]`` by one on the same key, bounded on the same sides."""

    def solve(self, time_limit_s: float = 60.0) -> Solution | None: ...


@dataclass
class LinearForm:
    """The problem as arrays: the one statement of the program that every built-in solver translates.

    Entry j is one (layer, variant) pair with a binary x_j; a layer's entries
    are contiguous, ``entries[starts[i]:starts[i + 1]]`` for layer i. The program:

        minimise (maximise if ``maximize``)  cost @ x
        subject to  x sums to 1 over each layer's entries
                    lower <= rows @ x <= upper

    There is one row per constraint, in ``Problem.constraints`` order, then one
    per excluded solution: its entries, of which at most
    ``n_layers - min_diversity`` may be chosen again, then one per ``Link``:
    its two-layer blocks minus its spanned entry, equal to 0. Offsets move into the
    bounds, and each row is divided by its largest |coefficient|: solvers'
    tolerances are absolute, and parameter counts (1e9 per block) would
    otherwise dwarf them.

    An entry that another entry of its layer dominates (no worse objective, and
    no worse on any row given the sides the row is bounded on) is left out: a
    best solution never needs it, and the program shrinks (to about a quarter
    at 160 variants per layer).
    """

    entries: list[tuple[str, str]]
    starts: np.ndarray
    cost: np.ndarray
    maximize: bool
    rows: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    constraints: list[Constraint]
    offsets: np.ndarray
    scales: np.ndarray

    @classmethod
    def of(cls, problem: Problem) -> LinearForm:
        entries = [(layer, v) for layer in problem.layers for v in problem.variants[layer]]
        starts = np.cumsum([0] + [len(problem.variants[layer]) for layer in problem.layers])
        cost = np.array([problem.value(layer, v, problem.objective) for layer, v in entries])
        n_constraints, n_exclude = len(problem.constraints), len(problem.exclude)
        n_rows = n_constraints + n_exclude + len(problem.links)
        rows = np.zeros((n_rows, len(entries)))
        for i, c in enumerate(problem.constraints):
            rows[i] = [problem.value(layer, v, c.key) for layer, v in entries]
        for i, other in enumerate(problem.exclude, start=n_constraints):
            rows[i] = [other.get(layer) == v for layer, v in entries]
        for i, link in enumerate(problem.links, start=n_constraints + n_exclude):
            rows[i] = [(layer == link.layer and v in link.spanning) - (layer == link.next_layer and v == link.spanned)
                       for layer, v in entries]
        scales = np.abs(rows).max(axis=1, initial=0.0)
        scales[scales == 0] = 1.0
        offsets = np.array([problem.offsets.get(c.key, 0.0) for c in problem.constraints])
        form = cls(entries, starts, cost, problem.maximize, rows / scales[:, None], np.full(n_rows, -np.inf),
                   np.full(n_rows, np.inf), list(problem.constraints), offsets, scales)
        for i, c in enumerate(problem.constraints):
            form.lower[i], form.upper[i] = form.bounds(i, c)
        excluded = slice(n_constraints, n_constraints + n_exclude)
        form.upper[excluded] = (len(problem.layers) - problem.min_diversity) / scales[excluded]
        form.lower[n_constraints + n_exclude:] = form.upper[n_constraints + n_exclude:] = 0.0
        return form._without_dominated()

    def bounds(self, index: int, constraint: Constraint) -> tuple[float, float]:
        """Row ``index``'s (lower, upper) for ``constraint``, offset and scaled as the row is."""
        old = self.constraints[index]
        if (old.min is None, old.max is None) != (constraint.min is None, constraint.max is None):
            # the entries left out were dominated given the sides each row is bounded on
            raise ValueError(f"{constraint.describe()} is not bounded on the same sides as {old.describe()}")
        offset, scale = self.offsets[index], self.scales[index]
        lower = -np.inf if constraint.min is None else (constraint.min - offset) / scale
        upper = np.inf if constraint.max is None else (constraint.max - offset) / scale
        return lower, upper

    @property
    def layer_of(self) -> np.ndarray:
        """Each entry's layer, as an index into ``starts``."""
        return np.repeat(np.arange(len(self.starts) - 1), np.diff(self.starts))

    def choice(self, x: np.ndarray) -> dict[str, str]:
        """Per layer the entry with the largest x (binaries come back as floats near 0 or 1)."""
        return {
            self.entries[a][0]: self.entries[a + int(np.argmax(x[a:b]))][1]
            for a, b in zip(self.starts[:-1], self.starts[1:])
        }

    def _without_dominated(self) -> LinearForm:
        # every column below is "smaller is better", so dominance is a <= in every column
        columns = [-self.cost if self.maximize else self.cost]
        for row, lower, upper in zip(self.rows, self.lower, self.upper):
            if np.isfinite(upper):
                columns.append(row)
            if np.isfinite(lower):
                columns.append(-row)
        points = np.stack(columns, axis=1)
        keep = np.ones(len(self.entries), dtype=bool)
        for a, b in zip(self.starts[:-1], self.starts[1:]):
            p = points[a:b]
            no_worse = (p[:, None, :] <= p[None, :, :]).all(axis=2)  # [w, v]: w is no worse than v
            order = np.arange(b - a)
            # v goes if some other w is no worse, unless they tie and v comes first
            dominated = no_worse & ~(no_worse.T & (order[:, None] > order[None, :]))
            np.fill_diagonal(dominated, False)
            keep[a:b] = ~dominated.any(axis=0)
        counts = [int(keep[a:b].sum()) for a, b in zip(self.starts[:-1], self.starts[1:])]
        return dataclasses.replace(
            self,
            entries=[e for e, k in zip(self.entries, keep) if k],
            starts=np.cumsum([0] + counts),
            cost=self.cost[keep],
            rows=self.rows[:, keep],
        )


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
    """Build a problem from a parsed block library, checking its shape and every key the problem uses.

    Errors name the first offending layer, variant and key, so that a user can
    find it in a library of thousands of entries.
    """
    if not isinstance(library, dict) or not library:
        raise HwoptError("block library must be a non-empty JSON object of layer_<n> entries")
    constraints = list(constraints)
    layers = sorted(library, key=_layer_index)

    variants: dict[str, list[str]] = {}
    values: dict[str, dict[str, dict[str, float]]] = {}
    parents: dict[str, list[str]] = {}
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
            values[layer][variant] = _flatten(entry)
        parents[layer] = [v for v, entry in entries.items() if entry.get("parent") is True]

    problem = Problem(
        layers=layers,
        variants=variants,
        values=values,
        objective=objective,
        maximize=maximize,
        constraints=constraints,
        offsets=dict(offsets or {}),
        parent=_parent(parents),
        links=_links(library, layers),
    )
    problem.require([objective, *(c.key for c in constraints)])
    return problem


def _parent(flagged: dict[str, list[str]]) -> dict[str, str] | None:
    """The variant flagged ``"parent": true`` per layer; None if no layer flags one."""
    if not any(flagged.values()):
        return None
    for layer, names in flagged.items():
        if len(names) != 1:
            raise HwoptError(f"block library {layer} flags {len(names)} variants as the parent; "
                             "a library flags exactly one per layer, or none at all")
    return {layer: names[0] for layer, names in flagged.items()}


def _links(library: dict, layers: list[str]) -> list[Link]:
    """The two-layer blocks of a library (entries with ``"span": 2``) tied to the spanned entry they leave in
    the next layer; a malformed span is one error naming the layer and variant."""
    spanned = {layer: [v for v, e in library[layer].items() if e.get("spanned") is True] for layer in layers}
    links = []
    for layer in layers:
        spanning = []
        for variant, entry in library[layer].items():
            span = entry.get("span", 1)
            if span not in (1, 2) or isinstance(span, bool):
                raise HwoptError(f"block library {layer} variant {variant!r}: span {span!r} is not 1 or 2 layers")
            if span == 2:
                spanning.append(variant)
        if not spanning:
            continue
        following = f"layer_{_layer_index(layer) + 1}"
        if following not in library:
            raise HwoptError(f"block library {layer} variant {spanning[0]!r} spans two layers, but there is no "
                             f"{following}")
        if len(spanned[following]) != 1:
            raise HwoptError(f"block library {layer} has two-layer variants, so {following} must flag exactly one "
                             f"variant \"spanned\": true (it flags {len(spanned[following])})")
        links.append(Link(layer, tuple(spanning), following, spanned[following][0]))
    for layer in layers:
        if spanned[layer] and not any(link.next_layer == layer for link in links):
            raise HwoptError(f"block library {layer} variant {spanned[layer][0]!r} is flagged spanned, but no "
                             "variant of the layer before spans two layers")
    return links


def diverse_solutions(
    problem: Problem, solver: Solver, count: int, min_diversity: int = 1, time_limit_s: float = 60.0
) -> list[Solution]:
    """Up to ``count`` solutions, best first, each differing from every earlier one in ``min_diversity`` layers.

    As in NVIDIA's Puzzle demo: solve, exclude the answer, solve again. Fewer
    come back when no further choice meets the budgets.
    """
    found: list[Solution] = []
    while len(found) < count:
        earlier = [*problem.exclude, *(s.choice for s in found)]
        solution = solver.solve(
            dataclasses.replace(problem, exclude=earlier, min_diversity=min_diversity), time_limit_s
        )
        if solution is None:
            break
        found.append(solution)
    return found


def explain_infeasible(
    problem: Problem, solver: Solver, time_limit_s: float = 60.0
) -> list[str]:
    """One line per budget: the best total reachable under all the other budgets.

    Each side of a range counts as its own budget. For ``key <= max`` the line
    gives the lowest total reachable, for ``key >= min`` the highest, and how
    far that is from the budget, so the user knows what to relax and by how
    much.
    """
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
