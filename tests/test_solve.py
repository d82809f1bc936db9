"""The solve pass's problem and the built-in solvers, checked against brute force."""

import dataclasses
import itertools

import numpy as np
import pytest

from hwopt.builtin.mip_solvers import GreedySolver, HighsSolver, ScipSolver
from hwopt.errors import HwoptError
from hwopt.problem import Constraint, LinearForm, diverse_solutions, explain_infeasible, problem_from_library
from hwopt.solving import meet_measured_speedup

EXACT = [ScipSolver(), HighsSolver()]
exact_solvers = pytest.mark.parametrize("solver", EXACT, ids=lambda s: s.name)

KEYS = ("stats.runtime_ms", "stats.memory_mib", "metrics.kl_div")


def random_library(seed: int, n_layers: int = 4, n_variants: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"layer_{i}": {
            f"v{j}": {
                "stats": {
                    "runtime_ms": float(rng.uniform(1, 10)),
                    "memory_mib": float(rng.uniform(10, 100)),
                    "note": "carried along",
                },
                "metrics": {"kl_div": float(rng.uniform(0, 1))},
            }
            for j in range(n_variants)
        }
        for i in range(n_layers)
    }


def library_total(library: dict, choice: dict, key: str, offset: float = 0.0) -> float:
    """A key's total for a choice, read straight from the nested library."""
    section, name = key.split(".")
    return offset + sum(library[layer][v][section][name] for layer, v in choice.items())


def brute_force(
    library, objective, constraints, maximize=False, offsets=None, exclude=(), diversity=1
):
    """The best feasible choice and its objective by enumeration, or (None, None)."""
    offsets = offsets or {}
    layers = list(library)
    best_choice, best_value = None, None
    for combo in itertools.product(*(library[layer] for layer in layers)):
        choice = dict(zip(layers, combo))
        totals = {
            c.key: library_total(library, choice, c.key, offsets.get(c.key, 0.0))
            for c in constraints
        }
        ok = all(
            (c.max is None or totals[c.key] <= c.max) and (c.min is None or totals[c.key] >= c.min)
            for c in constraints
        ) and all(sum(choice[layer] != e[layer] for layer in layers) >= diversity for e in exclude)
        if not ok:
            continue
        value = library_total(library, choice, objective, offsets.get(objective, 0.0))
        if best_value is None or (value > best_value if maximize else value < best_value):
            best_choice, best_value = choice, value
    return best_choice, best_value


def assert_meets(library, solution, constraints, offsets=None):
    """Every constraint holds on totals recomputed from the library, not from the solver."""
    offsets = offsets or {}
    for c in constraints:
        total = library_total(library, solution.choice, c.key, offsets.get(c.key, 0.0))
        assert total == pytest.approx(solution.totals[c.key])
        if c.max is not None:
            assert total <= c.max + 1e-9, c.describe()
        if c.min is not None:
            assert total >= c.min - 1e-9, c.describe()


def budgets(library, seed):
    """A max on runtime and a (min, max) range on memory, drawn from the spread of random choices.

    Every third seed gets a runtime cap below any sampled choice, which is often infeasible.
    """
    rng = np.random.default_rng(seed + 1000)
    samples = [
        {layer: rng.choice(list(variants)) for layer, variants in library.items()}
        for _ in range(50)
    ]
    runtime = [library_total(library, s, "stats.runtime_ms") for s in samples]
    memory = [library_total(library, s, "stats.memory_mib") for s in samples]
    runtime_cap = 0.7 * min(runtime) if seed % 3 == 2 else float(np.quantile(runtime, 0.4))
    return [
        Constraint("stats.runtime_ms", max=runtime_cap),
        Constraint(
            "stats.memory_mib",
            min=float(np.quantile(memory, 0.2)),
            max=float(np.quantile(memory, 0.7)),
        ),
    ]


@exact_solvers
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_optimal_against_brute_force(seed, maximize, solver):
    library = random_library(seed, n_layers=4, n_variants=3 + seed % 2)
    constraints = budgets(library, seed)
    problem = problem_from_library(library, "metrics.kl_div", constraints, maximize=maximize)

    solution = solver.solve(problem, time_limit_s=10)
    _, expected = brute_force(library, "metrics.kl_div", constraints, maximize=maximize)

    if expected is None:
        assert solution is None
        return
    assert solution.status == "optimal"
    assert solution.objective == pytest.approx(expected, abs=1e-9)
    assert solution.objective == pytest.approx(
        library_total(library, solution.choice, "metrics.kl_div")
    )
    assert problem.is_feasible(solution.choice)
    assert_meets(library, solution, constraints)


def test_random_instances_include_feasible_and_infeasible_ones():
    """The brute-force comparison above exercises both outcomes, not just one."""
    outcomes = {
        brute_force(lib, "metrics.kl_div", budgets(lib, seed))[1] is None
        for seed in range(6)
        for lib in [random_library(seed, n_layers=4, n_variants=3 + seed % 2)]
    }
    assert outcomes == {True, False}


@exact_solvers
def test_offsets_count_towards_budgets(solver):
    library = random_library(7)
    free = solver.solve(problem_from_library(library, "metrics.kl_div", []))
    # the unconstrained optimum fits this budget, but not once 5 ms outside the layers count
    budget = library_total(library, free.choice, "stats.runtime_ms") + 1.0
    constraints = [Constraint("stats.runtime_ms", max=budget)]
    offsets = {"stats.runtime_ms": 5.0}

    without = solver.solve(problem_from_library(library, "metrics.kl_div", constraints))
    problem = problem_from_library(library, "metrics.kl_div", constraints, offsets=offsets)
    solution = solver.solve(problem)
    _, expected = brute_force(library, "metrics.kl_div", constraints, offsets=offsets)

    assert without.objective == pytest.approx(free.objective)
    assert expected is not None and solution.objective == pytest.approx(expected)
    assert solution.objective > free.objective
    assert solution.totals["stats.runtime_ms"] == pytest.approx(
        library_total(library, solution.choice, "stats.runtime_ms") + 5.0
    )
    assert_meets(library, solution, constraints, offsets)


@exact_solvers
@pytest.mark.parametrize("diversity", [1, 2, 3])
def test_excluded_solutions_and_diversity(diversity, solver):
    library = random_library(11)
    constraints = [Constraint("stats.runtime_ms", max=25.0)]
    problem = problem_from_library(library, "metrics.kl_div", constraints)
    first = solver.solve(problem)

    problem.exclude = [first.choice]
    problem.min_diversity = diversity
    second = solver.solve(problem)
    _, expected = brute_force(
        library, "metrics.kl_div", constraints, exclude=[first.choice], diversity=diversity
    )

    assert sum(second.choice[layer] != first.choice[layer] for layer in library) >= diversity
    assert second.objective == pytest.approx(expected)
    assert second.objective >= first.objective
    assert_meets(library, second, constraints)


@exact_solvers
def test_infeasible_returns_none_and_explains_the_budgets(solver):
    library = random_library(3)
    _, fastest = brute_force(library, "stats.runtime_ms", [])
    _, smallest = brute_force(library, "stats.memory_mib", [])
    runtime_cap = fastest + 1.0
    _, smallest_fast = brute_force(
        library, "stats.memory_mib", [Constraint("stats.runtime_ms", max=runtime_cap)]
    )
    assert smallest < smallest_fast  # so a memory cap between them conflicts with the runtime cap
    memory_cap = (smallest + smallest_fast) / 2
    constraints = [
        Constraint("stats.runtime_ms", max=runtime_cap),
        Constraint("stats.memory_mib", max=memory_cap),
    ]
    problem = problem_from_library(library, "metrics.kl_div", constraints)
    assert brute_force(library, "metrics.kl_div", constraints)[1] is None

    assert solver.solve(problem) is None
    runtime_line, memory_line = explain_infeasible(problem, solver)

    _, runtime_reachable = brute_force(library, "stats.runtime_ms", constraints[1:])
    assert runtime_line.startswith(f"stats.runtime_ms <= {runtime_cap:.6g}: the lowest reachable")
    relax = runtime_reachable - runtime_cap
    assert f"is {runtime_reachable:.6g} (relax by {relax:.6g}" in runtime_line
    assert memory_line.startswith(f"stats.memory_mib <= {memory_cap:.6g}: the lowest reachable")
    assert f"is {smallest_fast:.6g} (relax by {smallest_fast - memory_cap:.6g}" in memory_line


@exact_solvers
def test_explain_treats_each_side_of_a_range_alone(solver):
    library = random_library(5)
    _, highest = brute_force(library, "stats.memory_mib", [], maximize=True)
    problem = problem_from_library(
        library,
        "metrics.kl_div",
        [
            Constraint("stats.memory_mib", min=highest + 10.0, max=highest + 50.0),
            Constraint("stats.runtime_ms", max=1000.0),
        ],
    )
    assert solver.solve(problem) is None

    memory_max, memory_min, runtime_max = explain_infeasible(problem, solver)

    # the range's own minimum is out of reach, so relaxing its maximum or the runtime cap is no use
    assert memory_max.startswith(f"stats.memory_mib <= {highest + 50:.6g}:")
    assert "does not help" in memory_max
    assert runtime_max.startswith("stats.runtime_ms <= 1000:")
    assert "does not help" in runtime_max
    assert memory_min == (
        f"stats.memory_mib >= {highest + 10:.6g}: the highest reachable under the other "
        f"constraints is {highest:.6g} (relax by 10, {100 * 10 / (highest + 10):.3g}%)"
    )


@exact_solvers
def test_explain_names_an_exclusion_nothing_can_meet(solver):
    library = random_library(2, n_layers=2, n_variants=2)
    problem = problem_from_library(library, "metrics.kl_div", [])
    problem.exclude = [{"layer_0": "v0", "layer_1": "v0"}]
    problem.min_diversity = 3
    assert solver.solve(problem) is None
    assert explain_infeasible(problem, solver) == [
        "no combination differs from all 1 excluded solutions in at least 3 layers"
    ]


def test_registered_through_the_hook():
    from hwopt import plugins

    for name, kind in (("scip", ScipSolver), ("highs", HighsSolver), ("greedy", GreedySolver)):
        assert isinstance(plugins.solvers().get(name), kind)
        assert plugins.solvers().plugin_of[name] == "hwopt.builtin.solvers"


def test_library_layers_are_ordered_numerically_and_leaves_flattened():
    library = {
        f"layer_{i}": {"a": {"stats": {"x": float(i)}, "metrics": {"m": 1}}} for i in (10, 2, 0, 9)
    }
    problem = problem_from_library(library, "metrics.m", [Constraint("stats.x", max=100)])
    assert problem.layers == ["layer_0", "layer_2", "layer_9", "layer_10"]
    assert problem.value("layer_9", "a", "stats.x") == 9.0
    assert problem.value("layer_9", "a", "metrics.m") == 1.0


@exact_solvers
def test_solution_to_json(solver):
    problem = problem_from_library(random_library(1), "metrics.kl_div", [])
    data = solver.solve(problem).to_json()
    assert set(data) == {"choice", "objective", "totals", "solver", "status", "gap", "wall_s"}
    assert data["solver"] == solver.name and data["status"] == "optimal" and data["gap"] == 0


ENTRY = {"stats": {"runtime_ms": 1.0}, "metrics": {"kl_div": 0.1}}


@pytest.mark.parametrize(
    "library, words",
    [
        ([ENTRY], "JSON object"),
        ({}, "JSON object"),
        ({"layer_0": {"a": ENTRY}, "block_1": {"a": ENTRY}}, "'block_1'"),
        ({"layer_0": {"a": ENTRY}, "layer_01": {"a": ENTRY}}, "'layer_01'"),
        ({"layer_0": {"a": ENTRY}, "layer_1": {}}, "layer_1 has no variants"),
        ({"layer_0": {"a": ENTRY}, "layer_1": ["a"]}, "layer_1 has no variants"),
        ({"layer_0": {"a": ENTRY, "b": 3.0}}, "layer_0 variant 'b' is not an object"),
        (
            {"layer_0": {"a": ENTRY}, "layer_1": {"a": ENTRY, "b": {"stats": {"runtime_ms": 1.0}}}},
            "layer_1 variant 'b': metrics.kl_div is missing",
        ),
        (
            {"layer_0": {"a": {"stats": {"runtime_ms": "fast"}, "metrics": {"kl_div": 0.1}}}},
            "layer_0 variant 'a': stats.runtime_ms is missing or not a finite number",
        ),
        (
            {"layer_0": {"a": {"stats": {"runtime_ms": float("nan")}, "metrics": {"kl_div": 0.1}}}},
            "stats.runtime_ms is missing or not a finite number",
        ),
    ],
)
def test_malformed_library_is_one_line_error(library, words):
    with pytest.raises(HwoptError) as err:
        problem_from_library(library, "metrics.kl_div", [Constraint("stats.runtime_ms", max=5.0)])
    message = str(err.value)
    assert "\n" not in message
    assert words in message


@pytest.mark.parametrize(
    "kwargs, words",
    [({}, "needs a max, a min or both"), ({"min": 5.0, "max": 1.0}, "min is above max")],
)
def test_malformed_constraint_is_one_line_error(kwargs, words):
    with pytest.raises(HwoptError, match=words) as err:
        Constraint("stats.runtime_ms", **kwargs)
    assert "\n" not in str(err.value)


@exact_solvers
@pytest.mark.parametrize("diversity", [1, 3])
def test_diverse_solutions_are_the_best_that_differ_enough(diversity, solver):
    library = random_library(13)
    constraints = [Constraint("stats.runtime_ms", max=24.0)]
    problem = problem_from_library(library, "metrics.kl_div", constraints)

    found = diverse_solutions(problem, solver, count=4, min_diversity=diversity)

    assert len(found) == 4
    for i, solution in enumerate(found):
        earlier = [s.choice for s in found[:i]]
        _, expected = brute_force(library, "metrics.kl_div", constraints, exclude=earlier, diversity=diversity)
        assert solution.objective == pytest.approx(expected)
        for other in earlier:
            assert sum(solution.choice[layer] != other[layer] for layer in library) >= diversity
        assert_meets(library, solution, constraints)


def test_diverse_solutions_stop_when_no_more_differ():
    library = random_library(2, n_layers=2, n_variants=2)  # 4 architectures in all
    problem = problem_from_library(library, "metrics.kl_div", [])
    assert len(diverse_solutions(problem, ScipSolver(), count=10, min_diversity=1)) == 4
    assert len(diverse_solutions(problem, ScipSolver(), count=10, min_diversity=2)) == 2


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_greedy_answers_are_feasible_and_no_better_than_the_optimum(seed, maximize):
    library = random_library(seed, n_layers=5, n_variants=4)
    constraints = budgets(library, seed)
    problem = problem_from_library(library, "metrics.kl_div", constraints, maximize=maximize)

    solution = GreedySolver().solve(problem)
    _, best = brute_force(library, "metrics.kl_div", constraints, maximize=maximize)

    if solution is None:
        return
    assert solution.status == "heuristic" and solution.to_json()["gap"] is None
    assert problem.is_feasible(solution.choice)
    assert_meets(library, solution, constraints)
    assert best is not None
    assert (solution.objective <= best + 1e-9) if maximize else (solution.objective >= best - 1e-9)


def test_greedy_finds_answers_on_most_feasible_instances():
    results = []
    for seed in range(12):
        library = random_library(seed, n_layers=5, n_variants=4)
        constraints = budgets(library, seed)
        if brute_force(library, "metrics.kl_div", constraints)[1] is not None:
            problem = problem_from_library(library, "metrics.kl_div", constraints)
            results.append(GreedySolver().solve(problem) is not None)
    assert sum(results) >= 0.75 * len(results) > 0


def test_greedy_trades_the_least_objective_per_unit_of_budget():
    """Layer a's cheap variant costs 1 of objective per 1 ms saved; layer b's 0.1 per ms: greedy swaps b."""
    library = {
        "layer_0": {"big": entry(runtime=10, kl=0.0), "small": entry(runtime=5, kl=5.0)},
        "layer_1": {"big": entry(runtime=10, kl=0.0), "small": entry(runtime=5, kl=0.5)},
    }
    problem = problem_from_library(library, "metrics.kl_div", [Constraint("stats.runtime_ms", max=15)])
    solution = GreedySolver().solve(problem)
    assert solution.choice == {"layer_0": "big", "layer_1": "small"}


def test_greedy_returns_none_when_no_swap_helps():
    library = random_library(3)
    problem = problem_from_library(library, "metrics.kl_div", [Constraint("stats.runtime_ms", max=0.5)])
    assert GreedySolver().solve(problem) is None
    assert not GreedySolver.exact and ScipSolver.exact and HighsSolver.exact


def entry(runtime: float, kl: float, memory: float = 1.0, parent: bool | None = None) -> dict:
    data = {"stats": {"runtime_ms": runtime, "memory_mib": memory}, "metrics": {"kl_div": kl}}
    return data if parent is None else {**data, "parent": parent}


def test_linear_form_drops_dominated_variants_only():
    library = {"layer_0": {
        "parent": entry(runtime=10, kl=0.0),
        "good": entry(runtime=5, kl=1.0),
        "dominated": entry(runtime=6, kl=2.0),  # slower and worse than "good"
        "twin": entry(runtime=5, kl=1.0),  # the same as "good", which comes first
    }}
    capped = problem_from_library(library, "metrics.kl_div", [Constraint("stats.runtime_ms", max=8)])
    assert [v for _, v in LinearForm.of(capped).entries] == ["parent", "good"]
    # with a minimum on runtime, more runtime can be what is needed: nothing dominates on both sides
    ranged = problem_from_library(library, "metrics.kl_div", [Constraint("stats.runtime_ms", min=5.5, max=8)])
    assert [v for _, v in LinearForm.of(ranged).entries] == ["parent", "good", "dominated"]
    assert ScipSolver().solve(ranged).choice == {"layer_0": "dominated"}
    # maximising turns the objective around: "good" now beats "parent" on both, "dominated" is the best
    maximized = dataclasses.replace(capped, maximize=True)
    assert [v for _, v in LinearForm.of(maximized).entries] == ["good", "dominated"]


@exact_solvers
def test_budgets_on_parameter_counts_hold(solver):
    """A 1e9-sized key is held to the same relative tolerance (1e-6) as a millisecond one, not looser."""
    rng = np.random.default_rng(5)
    library = {
        f"layer_{i}": {
            f"v{j}": {"stats": {"num_params": float(rng.integers(1, 9) * 1e9 + rng.integers(0, 1000) * 1e6)},
                      "metrics": {"kl_div": float(rng.uniform(0, 1))}}
            for j in range(4)
        }
        for i in range(4)
    }
    _, smallest = brute_force(library, "stats.num_params", [])
    constraints = [Constraint("stats.num_params", max=smallest + 3e9 + 0.5e6)]  # totals are whole millions
    problem = problem_from_library(library, "metrics.kl_div", constraints)
    solution = solver.solve(problem)
    assert solution.objective == pytest.approx(brute_force(library, "metrics.kl_div", constraints)[1])
    assert solution.totals["stats.num_params"] <= constraints[0].max


def test_parent_is_the_flagged_variant_else_the_largest():
    flagged = {f"layer_{i}": {"a": entry(runtime=1, kl=1.0), "b": entry(runtime=2, kl=0.0, parent=True)}
               for i in range(2)}
    problem = problem_from_library(flagged, "metrics.kl_div", [])
    assert problem.parent == {"layer_0": "b", "layer_1": "b"}
    assert problem.reference_choice("stats.runtime_ms") == problem.parent

    published = {"layer_0": {"a": entry(runtime=3, kl=1.0, memory=1), "b": entry(runtime=2, kl=0.0, memory=9)}}
    problem = problem_from_library(published, "metrics.kl_div", [])
    assert problem.parent is None
    assert problem.reference_choice("stats.runtime_ms") == {"layer_0": "a"}
    assert problem.reference_choice("stats.memory_mib") == {"layer_0": "b"}


@pytest.mark.parametrize("flags, words", [((True, True), "flags 2 variants"), ((False, False), "flags 0 variants")])
def test_inconsistent_parent_flags_are_one_line_errors(flags, words):
    library = {
        "layer_0": {"a": entry(runtime=1, kl=1.0, parent=True), "b": entry(runtime=2, kl=0.0)},
        "layer_1": {"a": entry(runtime=1, kl=1.0, parent=flags[0]), "b": entry(runtime=2, kl=0.0, parent=flags[1])},
    }
    with pytest.raises(HwoptError, match=f"layer_1 {words} as the parent"):
        problem_from_library(library, "metrics.kl_div", [])


def test_a_time_limit_returns_the_best_so_far_or_says_to_raise_it():
    rng = np.random.default_rng(0)
    library = {f"layer_{i}": {f"v{j}": {"stats": {"runtime_ms": float(rng.uniform(1, 10))},
                                        "metrics": {"kl_div": float(rng.uniform(0, 1))}}
                              for j in range(40)} for i in range(60)}
    problem = problem_from_library(library, "metrics.kl_div", [Constraint("stats.runtime_ms", max=150.0)])
    for solver in EXACT:
        try:
            solution = solver.solve(problem, time_limit_s=1e-3)
        except HwoptError as err:
            assert f"{solver.name} found no solution within 0.001 s" in str(err)
            assert str(err).endswith("raise the time limit")
            continue
        assert solution.status == "time_limit" and problem.is_feasible(solution.choice)
        assert solution.gap > 0 and "gap" in solution.to_json()


# --- the solve pass's measured speedup: solve again while the chosen child measures short -------------------------

def _solver_with_measurements(measured: list[float], infeasible_above: float = float("inf")):
    """A fake solve (predicted speedup = the budget) and a fake timing returning ``measured`` in turn."""
    budgets = []

    def solve_at(budget):
        if budget > infeasible_above:
            raise HwoptError(f"nothing is {budget:.2f}x")
        budgets.append(budget)
        return {"solutions": [{"predicted_speedup": budget, "n": len(budgets)}]}

    def measure(result):
        return {"measured_speedup": measured[result["solutions"][0]["n"] - 1], "error": 0.01, "measured_ms": {}}
    return solve_at, measure, budgets


def test_a_child_measuring_short_is_solved_again_with_the_budget_raised_by_the_shortfall():
    solve_at, measure, budgets = _solver_with_measurements([1.47, 1.52, 1.60])
    result, checks = meet_measured_speedup(solve_at, measure, 1.5, checks=3)
    assert budgets == [1.5, pytest.approx(1.5 * 1.5 / 1.47)]  # stopped at the first child that met 1.5x
    assert result["solutions"][0]["n"] == 2
    assert [c["measured_speedup"] for c in checks] == [1.47, 1.52]
    assert checks[1] == {"budget_speedup": budgets[1], "predicted_speedup": budgets[1], "measured_speedup": 1.52,
                         "error": 0.01, "measured_ms": {}}


def test_a_child_short_by_less_than_its_timings_error_is_solved_again():
    solve_at, measure, budgets = _solver_with_measurements([1.49, 1.52])  # 1.49 * 1.01 >= 1.5, yet short
    result, checks = meet_measured_speedup(solve_at, measure, 1.5, checks=3)
    assert budgets == [1.5, pytest.approx(1.5 * 1.5 / 1.49)] and result["solutions"][0]["n"] == 2
    assert "within_error" not in checks[0]


def test_a_child_timed_on_a_loaded_machine_is_kept_and_the_budget_not_raised():
    from hwopt.progress import console

    solve_at, measure, budgets = _solver_with_measurements([1.38, 1.47, 1.91])

    def loaded(result):
        return {**measure(result), "others": 1.1, "disturbed": True}
    with console.capture() as printed:
        result, checks = meet_measured_speedup(solve_at, loaded, 1.5, checks=3)
    assert budgets == [1.5] and len(checks) == 1 and result["solutions"][0]["n"] == 1
    assert "not trusted" in printed.get()


def test_when_no_child_measures_the_speedup_the_fastest_measured_one_is_kept():
    solve_at, measure, budgets = _solver_with_measurements([1.40, 1.46, 1.43, 1.70])
    result, checks = meet_measured_speedup(solve_at, measure, 1.5, checks=3)
    assert len(budgets) == len(checks) == 3  # every child solved was measured; none beyond --speedup-checks
    assert result["solutions"][0]["n"] == 2


def test_a_raised_budget_nothing_meets_keeps_the_fastest_measured_child_and_a_first_one_is_an_error():
    solve_at, measure, budgets = _solver_with_measurements([1.45], infeasible_above=1.52)
    result, checks = meet_measured_speedup(solve_at, measure, 1.5, checks=3)
    assert budgets == [1.5] and result["solutions"][0]["n"] == 1 and len(checks) == 1
    solve_at, measure, _ = _solver_with_measurements([], infeasible_above=1.0)
    with pytest.raises(HwoptError, match="nothing is 1.50x"):
        meet_measured_speedup(solve_at, measure, 1.5, checks=3)
