"""`hwopt solve` on any block library file, budgets, diverse solutions, Pareto sweeps, and one-line errors."""

import json

import pyscipopt
import pytest
import scipy.optimize
from test_solve import brute_force, library_total, random_library

from hwopt.builtin import mip_solvers as builtin
from hwopt.cli import main
from hwopt.errors import HwoptError
from hwopt.problem import Constraint, LinearForm, problem_from_library
from hwopt.search_space import Scenario
from hwopt.solving import PREFILL, RUNTIME, TTFT, Budgets, parse_count, solve, with_budgets
from hwopt.sweep import SweepSpec, pareto_sweep

LIBRARY = random_library(21, n_layers=5, n_variants=4)


@pytest.fixture
def library_file(tmp_path):
    path = tmp_path / "block_library.json"
    path.write_text(json.dumps(LIBRARY))
    return path


def solve_cli(*args) -> int:
    return main(["solve", *map(str, args)])


def assert_one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hwopt: error:"), err
    for needle in needles:
        assert needle in err, err


def test_library_mode_writes_every_solution(library_file, tmp_path):
    out = tmp_path / "out.json"
    rc = solve_cli("--library", library_file, "--max", "stats.runtime_ms=26", "--range", "stats.memory_mib=150:300",
                   "--num-solutions", 3, "--min-diversity", 2, "--json", out)
    assert rc == 0
    result = json.loads(out.read_text())
    constraints = [Constraint("stats.runtime_ms", max=26), Constraint("stats.memory_mib", min=150, max=300)]
    assert result["constraints"] == [c.describe() for c in constraints]
    first, *others = result["solutions"]
    assert len(others) == 2
    assert first["objective"] == pytest.approx(brute_force(LIBRARY, "metrics.kl_div", constraints)[1])
    for i, s in enumerate(result["solutions"]):
        assert set(s) == {"choice", "objective", "totals", "solver", "status", "gap", "wall_s"}
        assert set(s["choice"]) == set(LIBRARY) and s["solver"] == "scip" and s["status"] == "optimal"
        assert set(s["totals"]) == {"metrics.kl_div", "stats.runtime_ms", "stats.memory_mib"}
        assert library_total(LIBRARY, s["choice"], "stats.runtime_ms") <= 26 + 1e-9
        assert 150 - 1e-9 <= library_total(LIBRARY, s["choice"], "stats.memory_mib") <= 300 + 1e-9
        for earlier in result["solutions"][:i]:
            assert sum(s["choice"][layer] != earlier["choice"][layer] for layer in LIBRARY) >= 2


def test_a_budget_of_none_is_no_budget_in_library_mode(library_file, tmp_path):
    """`none` forgets what a run remembers; with no run, it is the same as leaving the budget out."""
    outs = [tmp_path / "none.json", tmp_path / "absent.json"]
    assert solve_cli("--library", library_file, "--max", "stats.runtime_ms=26", "--memory", "none",
                     "--json", outs[0]) == 0
    assert solve_cli("--library", library_file, "--max", "stats.runtime_ms=26", "--json", outs[1]) == 0
    none, absent = (json.loads(out.read_text()) for out in outs)
    assert none["constraints"] == absent["constraints"] == [Constraint("stats.runtime_ms", max=26).describe()]
    assert none["solutions"][0]["choice"] == absent["solutions"][0]["choice"]


@pytest.mark.parametrize("solver", ["scip", "highs", "greedy"])
def test_every_solver_and_maximise(library_file, tmp_path, solver):
    out = tmp_path / "out.json"
    assert solve_cli("--library", library_file, "--max", "stats.runtime_ms=30", "--maximize", "--solver", solver,
                     "--json", out) == 0
    best = json.loads(out.read_text())["solutions"][0]
    _, expected = brute_force(LIBRARY, "metrics.kl_div", [Constraint("stats.runtime_ms", max=30)], maximize=True)
    assert best["solver"] == solver
    if solver == "greedy":
        assert best["objective"] <= expected + 1e-9 and best["gap"] is None
    else:
        assert best["objective"] == pytest.approx(expected)


def test_prints_a_summary(library_file, capsys):
    assert solve_cli("--library", library_file, "--max", "stats.runtime_ms=26") == 0
    err = capsys.readouterr().err
    assert "solution 0, per layer" in err and "layer_4" in err and "optimal" in err


@pytest.mark.parametrize("text, error", [
    ("{not json", "is not JSON: Expecting property name"),
    ("[1, 2]", "must be a non-empty JSON object"),
    ('{"layer_0": {"a": {"stats": {"runtime_ms": 1}}}}', "layer_0 variant 'a': metrics.kl_div is missing"),
    ('{"layer_0": {"a": {"stats": {"runtime_ms": "1"}, "metrics": {"kl_div": 0}}}}',
     "layer_0 variant 'a': stats.runtime_ms is missing or not a finite number"),
    ('{"layer_0": {}}', "layer_0 has no variants"),
    ('{"block_0": {}}', "'block_0' is not of the form layer_<n>"),
])
def test_malformed_library_file_is_one_error_line(tmp_path, capsys, text, error):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert solve_cli("--library", path, "--max", "stats.runtime_ms=5") == 2
    assert_one_error_line(capsys, error)


def test_missing_or_binary_library_file_is_one_error_line(tmp_path, capsys):
    assert solve_cli("--library", tmp_path / "nope.json", "--latency", 5) == 2
    assert_one_error_line(capsys, "nope.json does not exist")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    assert solve_cli("--library", tmp_path / "binary.json", "--latency", 5) == 2
    assert_one_error_line(capsys, "cannot read block library")


@pytest.mark.parametrize("args, error", [
    (["--max", "stats.runtime_ms"], "--max takes KEY=VALUE"),
    (["--range", "stats.runtime_ms=5"], "--range takes KEY=LOW:HIGH"),
    (["--range", "stats.runtime_ms=9:5"], "min is above max"),
    (["--params", "lots"], "--params takes a count"),
    (["--memory", "1.2.3GiB"], "--memory takes a size such as"),  # was a ValueError's traceback
    (["--memory", "0"], "--memory must be more than 0, not '0'"),  # was accepted, then infeasible
    (["--params", "0B"], "--params must be more than 0, not '0B'"),
    (["--throughput", "100"], "--throughput needs the workload"),
    (["--latency", "-1"], "--latency must be a positive number"),
    (["--max", "stats.runtime_ms=nan"], "its bounds must be finite numbers"),
    (["--range", "stats.runtime_ms=1:inf"], "its bounds must be finite numbers"),
    (["--max", "stats.nope=1"], "stats.nope is missing"),
    (["--max", "stats.runtime_ms=9", "--num-solutions", "0"], "--num-solutions and --min-diversity must be at least 1"),
    (["--max", "stats.runtime_ms=9", "--solver", "cplex"], "unknown solver 'cplex'"),
    (["--sweep", "stats.runtime_ms=0.5:1"], "--sweep takes KEY=START:STOP:POINTS"),
    (["--sweep", "stats.runtime_ms=0.5:1:3"], "--sweep needs --json"),
])
def test_bad_options_are_one_error_line(library_file, capsys, args, error):
    assert solve_cli("--library", library_file, *args) == 2
    assert_one_error_line(capsys, error)


@pytest.mark.parametrize("command", ["solve", "evaluate"])
@pytest.mark.parametrize("value", ["0", "0GiB", "12x", "1.2.3GiB", "nan"])
def test_max_memory_takes_a_positive_size_or_says_so_in_one_line(capsys, command, value):
    """Refused by the parser, before a run directory is read or torch imported (it took 16-23 s in evaluate)."""
    with pytest.raises(SystemExit) as stopped:
        main([command, f"--max-memory={value}", *(["--model", "x"] if command == "evaluate" else [])])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"--max-memory: --max-memory takes a positive size such as 8GiB or 512MiB, not '{value}'" in err[-1]


@pytest.mark.parametrize("option", ["--speedup", "--latency", "--time-limit"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_number_option_refuses_nan_and_inf_in_one_line(library_file, capsys, option, value):
    """``float`` takes them; SCIP asserted on a nan budget (a traceback) and inf made every layer a no-op."""
    with pytest.raises(SystemExit) as stopped:
        solve_cli("--library", library_file, f"{option}={value}")  # = : argparse takes "-inf" for an option
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hwopt solve: error:") and f"{option}: invalid finite value: '{value}'" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_library_options_need_a_library(tmp_path, capsys):
    assert solve_cli("--workdir", tmp_path, "--max", "stats.runtime_ms=5", "--json", tmp_path / "x.json") == 2
    assert_one_error_line(capsys, "--max, --json: only with --library FILE")


def test_infeasible_budgets_are_explained_in_one_line(library_file, capsys):
    assert solve_cli("--library", library_file, "--max", "stats.runtime_ms=5", "--max", "stats.memory_mib=100") == 2
    _, lowest = brute_force(LIBRARY, "stats.runtime_ms", [Constraint("stats.memory_mib", max=100)])
    assert_one_error_line(capsys, "no architecture in the library meets the budgets",
                          f"stats.runtime_ms <= 5: the lowest reachable under the other constraints is {lowest:.6g}",
                          "the fastest child in the library is", "x the largest blocks")


def trap_library() -> dict:
    """Greedy's cheapest first move (to "b") leaves memory over budget with no single swap that helps."""
    def variant(runtime, memory, kl):
        return {"stats": {"runtime_ms": runtime, "memory_mib": memory}, "metrics": {"kl_div": kl}}

    return {f"layer_{i}": {"a": variant(10, 0, 0.0), "b": variant(0, 12, 0.1), "c": variant(4, 4, 1.0)}
            for i in range(2)}


def test_greedy_failing_says_an_exact_solver_finds_one(tmp_path, capsys):
    path = tmp_path / "trap.json"
    path.write_text(json.dumps(trap_library()))
    budget = ["--max", "stats.runtime_ms=10", "--max", "stats.memory_mib=10"]
    assert solve_cli("--library", path, *budget, "--solver", "greedy") == 2
    assert_one_error_line(capsys, "greedy found no architecture within the budgets, but scip finds one",
                          "metrics.kl_div 2)", "use --solver scip or highs")
    assert solve_cli("--library", path, *budget, "--json", tmp_path / "out.json") == 0
    assert json.loads((tmp_path / "out.json").read_text())["solutions"][0]["choice"] == {"layer_0": "c",
                                                                                         "layer_1": "c"}


def costed_library(with_ttft: bool) -> dict:
    """Two layers with parent flags, parameter counts, prefill (and TTFT) times, as the score pass writes."""
    def variant(runtime, params, prefill, kl, parent=False):
        stats = {"runtime_ms": runtime, "memory_mib": params / 1e6, "num_params": params, "prefill_ms": prefill}
        if with_ttft:
            stats["ttft_ms"] = prefill + 1
        return {"stats": stats, "metrics": {"kl_div": kl}, "parent": parent, "block_config": {"name": "x"},
                "attention": "att", "ffn": "ffn"}

    return {f"layer_{i}": {"big": variant(10, 2e9, 4, 0.0, parent=True), "small": variant(4, 5e8, 1, 1.0)}
            for i in range(2)}


def test_convenience_budgets_become_constraints():
    problem = problem_from_library(costed_library(with_ttft=False), "metrics.kl_div", [])
    budgets = Budgets(speedup=2, latency=12, ttft=6, params="3B", memory="2GiB")
    constrained = with_budgets(problem, budgets, None)
    assert [c.describe() for c in constrained.constraints] == [
        "stats.runtime_ms <= 10", "stats.memory_mib <= 2048", "stats.prefill_ms <= 6", "stats.num_params <= 3e+09"]
    with_ttft = problem_from_library(costed_library(with_ttft=True), "metrics.kl_div", [])
    assert with_budgets(with_ttft, Budgets(ttft=6), None).constraints == [Constraint(TTFT, max=6)]
    # 2 x 150 tokens at 600 tokens/s is 500 ms
    (runtime,) = with_budgets(problem, Budgets(throughput=600), Scenario(2, 100, 50)).constraints
    assert runtime.key == RUNTIME and runtime.max == pytest.approx(500)
    assert Budgets(ttft=1).keys(PREFILL) == [PREFILL]


@pytest.mark.parametrize("text, count", [("50B", 50e9), ("135M", 135e6), ("7e9", 7e9), ("1.5k", 1500), ("12", 12)])
def test_parameter_counts(text, count):
    assert parse_count(text) == pytest.approx(count)


def test_pipeline_solve_counts_costs_outside_the_layers(tmp_path):
    library = costed_library(with_ttft=True)
    costs = {"scenario": {"batch": 1, "input_len": 8, "output_len": 4, "dtype": "fp32"},
             "outside_layers": {"runtime_ms": 2.0, "memory_mib": 100.0, "num_params": 1e9, "ttft_ms": 1.0,
                                "source": {"kind": "measured"}}}
    # the layers alone fit 4e9 parameters; with the 1e9 outside them, one layer must shrink
    result = solve(library, costs, Budgets(params="4.5B"), "metrics.kl_div", "scip", tmp_path / "solutions.json",
                   num_solutions=2, min_diversity=1)
    best, second = result["solutions"]
    assert sorted(best["choice"].values()) == ["big", "small"] and best["objective"] == pytest.approx(1.0)
    assert best["totals"]["stats.num_params"] == pytest.approx(1e9 + 2e9 + 5e8)
    assert result["parent"]["totals"]["stats.runtime_ms"] == pytest.approx(22.0)
    assert best["predicted_speedup"] == pytest.approx(22.0 / 16.0)
    assert best["variants"] == [["att", "ffn"]] * 2 and best["blocks"] == [{"name": "x"}] * 2
    assert second["choice"] != best["choice"] and second["objective"] >= best["objective"]
    assert json.loads((tmp_path / "solutions.json").read_text()) == result


def test_sweep_writes_a_monotone_table_and_plot(library_file, tmp_path):
    out = tmp_path / "sweep.json"
    assert solve_cli("--library", library_file, "--sweep", "stats.runtime_ms=0.3:1:8", "--json", out) == 0
    sweep = json.loads(out.read_text())["sweep"]
    reference = {layer: max(v, key=lambda n: v[n]["stats"]["runtime_ms"]) for layer, v in LIBRARY.items()}
    assert sweep["reference_total"] == pytest.approx(library_total(LIBRARY, reference, "stats.runtime_ms"))
    assert len(sweep["points"]) == 8 and sweep["points"][-1]["fraction"] == 1.0
    objectives = []
    for point in sweep["points"]:
        _, expected = brute_force(LIBRARY, "metrics.kl_div", [Constraint("stats.runtime_ms", max=point["budget"])])
        solution = point["solution"]
        assert (solution is None) == (expected is None)
        if solution is not None:
            assert solution["objective"] == pytest.approx(expected)
            objectives.append(solution["objective"])
    assert len(objectives) >= 4 and objectives == sorted(objectives, reverse=True)  # looser budget, no worse
    rows = (tmp_path / "sweep.sweep.csv").read_text().splitlines()
    assert rows[0] == "fraction,budget,metrics.kl_div,stats.runtime_ms,solver,status,gap,wall_s"
    assert len(rows) == 9
    assert (tmp_path / "sweep.sweep.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("solver", [builtin.ScipSolver(), builtin.HighsSolver()], ids=lambda s: s.name)
def test_sweep_builds_the_model_once(monkeypatch, solver):
    forms, models, matrices = [], [], set()
    of, scip_model, milp = LinearForm.of, pyscipopt.Model, scipy.optimize.milp  # imported when a model is built
    monkeypatch.setattr(LinearForm, "of", staticmethod(lambda problem: forms.append(problem) or of(problem)))
    monkeypatch.setattr(pyscipopt, "Model", lambda *args: models.append(args) or scip_model(*args))
    monkeypatch.setattr(scipy.optimize, "milp", lambda *args, constraints, **kwargs: matrices.add(id(constraints.A))
                        or milp(*args, constraints=constraints, **kwargs))
    problem = problem_from_library(LIBRARY, "metrics.kl_div", [Constraint("stats.memory_mib", max=400)])

    sweep = pareto_sweep(problem, solver, SweepSpec("stats.runtime_ms", 0.4, 1.0, 5))

    assert len(forms) == 1
    # SCIP: one model whose budget row moves; HiGHS: one constraint matrix, only its bounds change
    assert len(models) == (solver.name == "scip") and len(matrices) == (solver.name == "highs")
    assert sum(p.solution is not None for p in sweep.points) >= 3


class SolveOnly:
    """A plugin-style solver without ``compile``: a sweep solves each budget afresh."""

    name = "solve-only"

    def solve(self, problem, time_limit_s=60.0):
        return builtin.HighsSolver().solve(problem, time_limit_s)


def test_sweep_without_compile_solves_each_budget():
    problem = problem_from_library(LIBRARY, "metrics.kl_div", [])
    spec = SweepSpec("stats.runtime_ms", 0.4, 1.0, 4)
    plain = pareto_sweep(problem, SolveOnly(), spec)
    compiled = pareto_sweep(problem, builtin.ScipSolver(), spec)
    assert [p.budget for p in plain.points] == [p.budget for p in compiled.points]
    for a, b in zip(plain.points, compiled.points):
        assert (a.solution is None) == (b.solution is None)
        assert a.solution is None or a.solution.objective == pytest.approx(b.solution.objective)


def test_sweep_rejects_a_key_that_is_already_bounded():
    problem = problem_from_library(LIBRARY, "metrics.kl_div", [Constraint("stats.runtime_ms", max=30)])
    with pytest.raises(HwoptError, match="also bounded"):
        pareto_sweep(problem, builtin.ScipSolver(), SweepSpec("stats.runtime_ms", 0.4, 1.0, 4))


def test_a_runs_library_is_budgeted_on_the_whole_model_as_the_run_does(tmp_path):
    """`solve --library RUN/score/block_library.json --speedup 2` adds the run's costs outside the layers (its
    profile's LM head and embeddings), as the run's solve pass does; a published library, which has none, says
    its budget is of the layers alone."""
    library = {f"layer_{i}": {"parent": {"stats": {"runtime_ms": 4.0}, "metrics": {"kl_div": 0.0}, "parent": True},
                              "half": {"stats": {"runtime_ms": 2.0}, "metrics": {"kl_div": 0.1 + i / 100}},
                              "none": {"stats": {"runtime_ms": 0.0}, "metrics": {"kl_div": 1.0 + i / 100}}}
               for i in range(4)}  # parent: 16 ms of layers
    run = tmp_path / "run"
    (run / "score").mkdir(parents=True)
    (run / "profile").mkdir()
    (run / "run.json").write_text("{}")
    (run / "score" / "block_library.json").write_text(json.dumps(library))
    (run / "profile" / "costs.json").write_text(json.dumps({"outside_layers": {"runtime_ms": 4.0}}))
    published = tmp_path / "published.json"
    published.write_text(json.dumps(library))
    from hwopt.progress import console

    chosen = {}
    for name, path in (("run", run / "score" / "block_library.json"), ("published", published)):
        with console.capture() as printed:
            assert solve_cli("--library", path, "--speedup", 2, "--json", tmp_path / f"{name}.json") == 0
        chosen[name] = json.loads((tmp_path / f"{name}.json").read_text())["solutions"][0]["choice"]
        chosen[name + " said"] = printed.get()
    # layers alone: 8 ms of 16 is 2x, every layer halved; the whole model: (16 + 4) / 2 = 10 ms, 6 for the layers
    assert sorted(chosen["published"].values()) == ["half"] * 4
    assert sorted(chosen["run"].values()) == ["half", "half", "half", "none"]
    assert "costs outside the layers are from" in chosen["run said"]
    assert "budgets are of the layers alone" in chosen["published said"]
    # the per-layer table's rows add up to the totals: the run's has a row for the 4 ms outside the layers
    outside_row = [line for line in chosen["run said"].splitlines() if "outside the layers" in line and "│" in line]
    assert len(outside_row) == 1 and outside_row[0].split("│")[-2].strip() == "4"
    assert not [line for line in chosen["published said"].splitlines() if "outside the layers" in line and "│" in line]
