"""solve's choice among candidate children (hwopt.selection), with their distillation and timing stood in for.

The real thing, on a tiny model through every pass, is in tests/test_pipeline.py."""

from types import SimpleNamespace

import pytest

import hwopt.selection as selection


def solution(solver: str, runtime_ms: float) -> dict:
    return {"solver": solver, "predicted_speedup": 100 / runtime_ms, "totals": {"stats.runtime_ms": runtime_ms}}


TEXT = "validation English (hwopt/heldout/validation_english.txt)"


def solved(*solutions: dict) -> dict:
    """solve's result with these solutions, best first."""
    return {"parent": {"totals": {"stats.runtime_ms": 100.0}}, "solutions": list(solutions)}


@pytest.fixture
def candidates(monkeypatch):
    """A run asking 1.5x, the layer-dropping child at 60 ms where the budget allows it, and validation KLs by
    solver (``kls``) that the test sets."""
    kls, budgets = {}, []

    def layer_drop_entry(run, library, costs, budget_ms, parent_totals):
        budgets.append(budget_ms)
        return (solution("layer_drop", 60.0), "") if budget_ms >= 60 else (None, "dropping whole layers cannot ...")

    monkeypatch.setattr(selection, "layer_drop_entry", layer_drop_entry)
    monkeypatch.setattr(selection, "fits", lambda run, solutions: None)
    monkeypatch.setattr(selection, "validation_kl", lambda run, sol, coupled_dir: kls[sol["solver"]])
    run = SimpleNamespace(settings=SimpleNamespace(select_tokens=64, speedup=1.5))
    return run, kls, budgets


@pytest.mark.parametrize("mip_kl, first", [(0.5, "layer_drop"), (0.3, "mip")])
def test_the_candidate_with_the_lowest_validation_kl_goes_first(candidates, mip_kl, first):
    run, kls, budgets = candidates
    kls.update(scip=mip_kl, layer_drop=0.4)
    result = selection.select(run, solved(solution("scip", 66.0)), {}, {})
    assert budgets == [66.0]  # layer dropping within the MIP child's predicted runtime
    assert [s["candidate"] for s in result["solutions"]][0] == first
    assert result["selection"] == {"tokens": 64, "text": TEXT, "candidates": {"mip": mip_kl, "layer_drop": 0.4},
                                   "left_out": {}}


def test_every_mip_solution_is_a_candidate(candidates):
    run, kls, _ = candidates
    kls.update(scip=0.5, greedy=0.2, layer_drop=0.4)
    result = selection.select(run, solved(solution("scip", 66.0), solution("greedy", 65.0)), {}, {})
    assert [(s["candidate"], s["validation_kl"]) for s in result["solutions"]] == [
        ("mip_2", 0.2), ("layer_drop", 0.4), ("mip", 0.5)]


def test_without_a_layer_dropping_child_there_is_nothing_to_choose_and_solve_says_why(candidates, capsys):
    run, kls, _ = candidates
    result = solved(solution("scip", 50.0))  # faster than layer dropping reaches
    assert selection.select(run, result, {}, {}) == result and not kls
    assert "no layer-dropping child to compare (dropping whole layers cannot" in capsys.readouterr().err


def test_where_distilling_a_candidate_does_not_fit_the_mip_child_is_kept_and_solve_says_why(candidates, monkeypatch,
                                                                                           capsys):
    run, kls, budgets = candidates
    monkeypatch.setattr(selection, "fits", lambda run, solutions: "distilling a candidate child needs 9 GiB")
    result = solved(solution("scip", 66.0))
    assert selection.select(run, result, {}, {}) == result and not kls and not budgets
    assert "candidates not compared, the MIP's child kept: distilling a candidate child needs 9 GiB" in \
        capsys.readouterr().err


@pytest.mark.parametrize("measured, disturbed, first", [(1.45, False, "mip"), (1.45, True, "layer_drop"),
                                                         (1.52, False, "layer_drop")])
def test_a_layer_dropping_child_that_measures_short_on_a_quiet_machine_is_left_out(candidates, measured, disturbed,
                                                                                   first):
    """Where solve checks speed, the layer-dropping child (which the speed checks did not time) is timed before it
    is kept; as with the speed checks, a loaded machine's figure does not reject it."""
    run, kls, _ = candidates
    kls.update(scip=0.5, layer_drop=0.4)
    timed = []

    def measure(sol):
        timed.append(sol["solver"])
        return {"measured_speedup": measured, "disturbed": disturbed}

    result = selection.select(run, solved(solution("scip", 66.0)), {}, {}, measure=measure)
    assert timed == ["layer_drop"] and result["solutions"][0]["candidate"] == first
    assert len(result["solutions"]) == (1 if first == "mip" else 2)
    assert result["selection"]["left_out"] == ({"layer_drop": "measured 1.45x here, short of 1.50x"}
                                               if first == "mip" else {})


def test_any_candidate_the_speed_checks_did_not_time_is_timed_before_it_is_kept(candidates):
    """A second MIP solution that wins is timed too; one that measures short gives way to the next."""
    run, kls, _ = candidates
    kls.update(scip=0.5, greedy=0.2, layer_drop=0.4)
    timed = []

    def measure(sol):
        timed.append(sol["solver"])
        return {"measured_speedup": 1.4 if sol["solver"] == "greedy" else 1.6, "disturbed": False}

    result = selection.select(run, solved(solution("scip", 66.0), solution("greedy", 65.0)), {}, {},
                              measure=measure)
    assert timed == ["greedy", "layer_drop"] and result["solutions"][0]["candidate"] == "layer_drop"
    assert list(result["selection"]["left_out"]) == ["mip_2"]


def test_the_mip_child_is_not_timed_again(candidates):
    run, kls, _ = candidates
    kls.update(scip=0.3, layer_drop=0.4)
    result = selection.select(run, solved(solution("scip", 66.0)), {}, {},
                              measure=lambda sol: pytest.fail("timed"))
    assert result["solutions"][0]["candidate"] == "mip"
