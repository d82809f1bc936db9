"""The run-directory rules: staged passes, resumable units, fingerprints; budgets as constraints."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
from conftest import FAST_RUN

from hwopt import scoring as score_module
from hwopt.cli import build_parser, main
from hwopt.errors import HwoptError
from hwopt.pipeline import (
    atomic_write_json,
    fingerprint,
    is_up_to_date,
    kept_units,
    locked_run_dir,
    output_hash,
    read_manifest,
    staged_pass,
)
from hwopt.run import Settings, load_settings
from hwopt.scoring import block_stats
from hwopt.search_space import Scenario
from hwopt.solving import RUNTIME, Budgets, parse_memory_mib


def test_pass_appears_only_when_complete(tmp_path):
    target = tmp_path / "score"
    with pytest.raises(RuntimeError), staged_pass(target, "fp1") as out:
        (out / "half.json").write_text("{}")
        raise RuntimeError("killed")
    assert not target.exists()
    assert (tmp_path / "score.partial" / "half.json").is_file()  # kept for the rerun to resume from

    with staged_pass(target, "fp1") as out:
        assert (out / "half.json").is_file()  # same fingerprint: finished units are reused
        (out / "rest.json").write_text("{}")
    assert not (tmp_path / "score.partial").exists()
    assert sorted(read_manifest(target)["files"]) == ["half.json", "rest.json"]
    assert is_up_to_date(target, "fp1") and not is_up_to_date(target, "fp2")


def test_partial_from_other_settings_is_discarded(tmp_path):
    target = tmp_path / "library"
    with pytest.raises(RuntimeError), staged_pass(target, "old") as out:
        (out / "stale.safetensors").write_text("x")
        raise RuntimeError
    with staged_pass(target, "new") as out:
        assert not (out / "stale.safetensors").exists()


def test_rerun_replaces_the_old_output_and_its_hash(tmp_path):
    target = tmp_path / "solve"
    with staged_pass(target, "a") as out:
        (out / "solutions.json").write_text('{"x": 1}')
    first = output_hash(target)
    with staged_pass(target, "b") as out:
        (out / "solutions.json").write_text('{"x": 2}')
    assert json.loads((target / "solutions.json").read_text()) == {"x": 2}
    assert output_hash(target) != first and not (tmp_path / "solve.old").exists()


def test_kept_units_stay_for_their_fingerprint_only(tmp_path):
    units = kept_units(tmp_path / "score", "fp1")
    (units / "layer_0.json").write_text("{}")
    assert kept_units(tmp_path / "score", "fp1") == units and (units / "layer_0.json").is_file()
    assert not (kept_units(tmp_path / "score", "fp2") / "layer_0.json").exists()


def test_a_new_profile_joins_its_costs_without_scoring_again(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    assert main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir), "--until", "score",
                 *FAST_RUN]) == 0
    before = json.loads((workdir / "score/block_library.json").read_text())
    units = sorted((workdir / "score.units").glob("layer_*.json"))
    assert len(units) == len(before) == 4
    written = [unit.stat().st_mtime_ns for unit in units]

    assert main(["profile", "--workdir", str(workdir), "--scenario", "32/8"]) == 0  # other costs
    costs = json.loads((workdir / "profile/costs.json").read_text())
    forwards, replace_one_block = [], score_module.replace_one_block
    monkeypatch.setattr(score_module, "replace_one_block",
                        lambda *args, **kwargs: forwards.append(args[3]) or replace_one_block(*args, **kwargs))
    assert main(["score", "--workdir", str(workdir)]) == 0
    assert forwards == []
    after = json.loads((workdir / "score/block_library.json").read_text())
    assert [unit.stat().st_mtime_ns for unit in units] == written
    assert after.keys() == before.keys()
    for layer, entries in after.items():
        assert entries.keys() == before[layer].keys()
        for name, entry in entries.items():
            assert entry["stats"] == block_stats(costs, entry["attention"], entry["ffn"])
            assert {**entry, "stats": None} == {**before[layer][name], "stats": None}  # the metrics as they were
        parent = next(name for name, entry in entries.items() if entry["parent"])
        assert entries[parent]["stats"]["runtime_ms"] != before[layer][parent]["stats"]["runtime_ms"]
    capsys.readouterr()
    assert main(["score", "--workdir", str(workdir)]) == 0
    assert "score: up to date, skipped" in capsys.readouterr().err
    assert main(["score", "--workdir", str(workdir), "--force"]) == 0
    assert len(forwards) == 1 and sorted(forwards[0]) == [0, 1, 2, 3]  # every layer scored again


def test_fingerprint_covers_settings_and_inputs():
    base = fingerprint({"a": 1}, {"library": "h1"})
    assert base == fingerprint({"a": 1}, {"library": "h1"})
    assert base != fingerprint({"a": 2}, {"library": "h1"})
    assert base != fingerprint({"a": 1}, {"library": "h2"})


def test_settings_merge_defaults_saved_and_command_line(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"model": "saved-model", "speedup": 2.0, "unknown_key": 1}))
    settings = load_settings(tmp_path, {"speedup": 3.0, "target": None})
    assert settings.model == "saved-model" and settings.speedup == 3.0 and settings.target == Settings().target


@pytest.mark.parametrize("text, mib", [("80GB", 80e9 / 2**20), ("512MiB", 512), ("1.5GiB", 1536), ("300", 300)])
def test_memory_sizes(text, mib):
    assert parse_memory_mib(text) == pytest.approx(mib)


@pytest.mark.parametrize("text", ["lots", "12 parsecs", ""])
def test_bad_memory_size_is_a_clear_error(text):
    with pytest.raises(HwoptError, match="--memory takes a size"):
        parse_memory_mib(text)


def test_budgets_become_whole_model_constraints():
    scenario = Scenario(batch=2, input_len=100, output_len=50)
    parent = {RUNTIME: 1000.0}
    (runtime,) = Budgets(speedup=2).constraints(parent, scenario)
    assert runtime.key == RUNTIME and runtime.max == 500
    # 2 x 150 tokens at 600 tokens/s is 500 ms; the tighter of two runtime budgets wins
    (runtime,) = Budgets(speedup=1.5, throughput=600).constraints(parent, scenario)
    assert runtime.max == pytest.approx(500)
    runtime, memory = Budgets(speedup=1.0, memory="1GiB").constraints(parent, scenario)
    assert memory.key == "stats.memory_mib" and memory.max == 1024
    for bad in (0, float("nan"), float("inf")):
        with pytest.raises(HwoptError, match="--speedup must be a positive number"):
            Budgets(speedup=bad).constraints(parent, scenario)


# --- the run directory never disagrees with itself ---------------------------------------------------------------

def finished_run(workdir, **settings):
    """A run directory whose profile, library and score passes have finished (with stand-in outputs). No parent
    samples unless asked: a pass's fingerprint would otherwise draw SmolLM2's 146K tokens (minutes) where the
    cache lacks them."""
    atomic_write_json(workdir / "run.json", dataclasses.asdict(Settings(**{"distill_samples": 0, **settings})))
    for name in ("profile", "library", "score"):
        with staged_pass(workdir / name, f"fp-{name}") as out:
            (out / "output.json").write_text("{}")
    return workdir


@pytest.mark.parametrize("text, needle", [
    ("{", "is not readable JSON (Expecting property name"),
    ("[]", "must hold a JSON object of settings, not a list"),
    ('{"model": 5}', "setting 'model' is 5, where it takes str"),
    ('{"speedup": "fast"}', "setting 'speedup' is \"fast\", where it takes float or null"),
    ('{"kv_heads": [1, "a"]}', "setting 'kv_heads' is [1, \"a\"], where it takes list[int] or null"),
    ('{"linear": 1}', "setting 'linear' is 1, where it takes bool"),
])
def test_a_broken_run_json_is_one_line_naming_the_file_and_key(tmp_path, capsys, text, needle):
    (tmp_path / "run.json").write_text(text)
    assert main(["solve", "--workdir", str(tmp_path), "--speedup", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "run.json") in err and needle in err, err
    assert (tmp_path / "run.json").read_text() == text  # left for the user to mend, not overwritten


def test_settings_of_every_type_a_run_saves_read_back(tmp_path):
    settings = Settings(speedup=2, kv_heads=[1, 3], data=["a.txt"], block_options={"window": [64, 256]})
    atomic_write_json(tmp_path / "run.json", dataclasses.asdict(settings))
    assert load_settings(tmp_path, {}) == settings


def test_a_remembered_budget_can_be_unset(tmp_path):
    finished_run(tmp_path, memory="1GiB", speedup=2.0)
    args = build_parser("solve").parse_args(["solve", "--memory", "none", "--speedup", "None"])
    settings = load_settings(tmp_path, {"memory": args.memory, "speedup": args.speedup})
    assert settings.memory is None and settings.speedup is None
    assert load_settings(tmp_path, {}).memory == "1GiB"  # what the run remembers, until a command saves


def test_a_setting_with_a_default_cannot_be_unset(tmp_path):
    with pytest.raises(HwoptError, match="--scenario cannot be unset"):
        load_settings(tmp_path, {"scenario": "none"})


def test_a_changed_setting_an_earlier_pass_used_stops_with_the_stale_pass(tmp_path, capsys):
    finished_run(tmp_path, speedup=2.0)
    before = (tmp_path / "run.json").read_text()
    assert main(["solve", "--workdir", str(tmp_path), "--scenario", "512/256"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "profile ran with other settings (scenario 128/64 -> 512/256), so it is stale for solve" in err
    assert "--from profile --until solve" in err
    assert (tmp_path / "run.json").read_text() == before  # the refused setting is not remembered


def test_a_pass_that_needs_a_run_refuses_a_directory_without_one(tmp_path, capsys):
    missing = tmp_path / "runs" / "dmeo"
    assert main(["solve", "--workdir", str(missing), "--speedup", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} holds no run (no run.json), and solve needs the outputs of profile, library, score" in err
    assert not missing.exists()  # nothing was created at the mistyped name


def test_a_pass_whose_inputs_are_missing_names_them_and_the_command_that_makes_them(tmp_path):
    from hwopt.run import Run

    finished_run(tmp_path, speedup=2.0)
    shutil.rmtree(tmp_path / "library")
    shutil.rmtree(tmp_path / "score")
    with pytest.raises(HwoptError) as raised:
        Run(tmp_path, load_settings(tmp_path, {})).fingerprint("solve")
    assert str(raised.value) == (f"solve needs the outputs of library, score in {tmp_path}: run `hwopt optimize "
                                 f"--workdir {tmp_path} --until score` first (it skips what is up to date)")


def test_a_pass_run_again_names_the_later_passes_it_left_out_of_date(tmp_path, capsys):
    from hwopt.run import Run

    finished_run(tmp_path, speedup=2.0)
    run = Run(tmp_path, load_settings(tmp_path, {}))
    for name in ("solve", "uptrain", "lower"):  # each made from the one before
        with staged_pass(tmp_path / name, run.fingerprint(name)) as out:
            (out / "output.json").write_text("{}")
    capsys.readouterr()
    run.say_what_is_out_of_date("solve")
    assert capsys.readouterr().err == ""  # all current
    with staged_pass(tmp_path / "solve", run.fingerprint("solve")) as out:  # solved again: another child
        (out / "output.json").write_text('{"another": "child"}')
    run.say_what_is_out_of_date("solve")
    assert capsys.readouterr().err.strip() == (f"uptrain, lower: made from earlier outputs, so out of date: `hwopt "
                                               f"optimize --workdir {tmp_path} --from uptrain` makes them again")


def test_out_of_date_passes_are_not_looked_for_where_that_would_draw_the_parent_samples(tmp_path, capsys,
                                                                                         monkeypatch):
    import hwopt.run
    from hwopt.run import Run

    finished_run(tmp_path, speedup=2.0, distill_samples=131072)
    for name in ("solve", "uptrain"):
        with staged_pass(tmp_path / name, f"fp-{name}") as out:
            (out / "output.json").write_text("{}")
    monkeypatch.setattr(Run, "sampling_plan", lambda self: ("a plan: the samples are not cached", False))

    def drawn(*args, **kwargs):
        raise AssertionError("the parent samples were drawn for a hint")

    monkeypatch.setattr(hwopt.run, "cached_parent_samples", drawn)
    capsys.readouterr()
    Run(tmp_path, load_settings(tmp_path, {})).say_what_is_out_of_date("solve")
    assert capsys.readouterr().err == ""


def test_a_second_command_on_a_run_in_use_is_refused_in_one_line(tmp_path, capsys):
    finished_run(tmp_path, speedup=2.0)
    with locked_run_dir(tmp_path):
        assert main(["solve", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"hwopt: error: {tmp_path} is in use by another hwopt command (pid {os.getpid()}); wait for it "
                   "to finish, or use another --workdir")
    with locked_run_dir(tmp_path):  # released when the holder is done
        pass


@pytest.mark.parametrize(("args", "needle"), [(["--model", "nope"], "nope"), (["--threads", "0"], "--threads 0"),
                                             (["--distill-samples", "-1"], "--distill-samples must be 0 or more"),
                                             (["--distill-temperature", "0"], "--distill-temperature must be above 0")])
def test_a_command_that_fails_on_bad_input_leaves_no_new_run_directory(tiny_llama_dir, tmp_path, capsys, args,
                                                                         needle):
    workdir = tmp_path / "x"
    command = ["optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir), "--speedup", "2", *args]
    assert main(command) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not workdir.exists()
    workdir.mkdir()  # an existing one is left as it was, with the lock released
    assert main(command) == 2
    assert {p.name for p in workdir.iterdir()} <= {".lock"}  # a bad name is refused before the lock is even taken
    with locked_run_dir(workdir):
        pass


def test_a_command_that_fails_leaves_the_remembered_settings_as_they_were(tmp_path, capsys, monkeypatch):
    from hwopt import passes
    from hwopt import run as run_module

    def failing_solve(run, out):
        raise HwoptError(f"{run.settings.objective} is missing or not a finite number")

    finished_run(tmp_path, speedup=2.0, threads=1)
    before = (tmp_path / "run.json").read_text()
    monkeypatch.setitem(passes.PASS_INFO, "solve", dataclasses.replace(passes.PASS_INFO["solve"], call=failing_solve))
    monkeypatch.setattr(run_module.Run, "check_upstream_current", lambda run, name: None)  # stand-ins' fingerprints
    assert main(["solve", "--workdir", str(tmp_path), "--objective", "metrics.js_div"]) == 2
    assert "metrics.js_div is missing" in capsys.readouterr().err
    assert (tmp_path / "run.json").read_text() == before  # the next command does not inherit the failed setting


def test_batch_zero_is_refused_not_read_as_one(capsys):
    assert main(["estimate", "--model", "smollm2-135m", "--target", "h100", "--batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch" in err


def test_estimate_with_require_measured_refuses_an_estimate(capsys):
    assert main(["estimate", "--model", "smollm2-135m", "--target", "h100", "--require-measured"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--require-measured" in err


def test_a_pass_after_a_stale_one_is_refused_until_the_stale_one_runs_again(tiny_llama_dir, tmp_path, capsys):
    """`solve` again, then `lower`: uptrain's child is the old solution's, so lower must not call itself up to date."""
    workdir = tmp_path / "run"
    assert main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir), "--until", "lower",
                 "--speedup", "1.2", "--speedup-checks", "0", *FAST_RUN]) == 0
    assert main(["solve", "--workdir", str(workdir), "--speedup", "1.4"]) == 0
    capsys.readouterr()
    assert main(["lower", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "uptrain is out of date" in err and "--from uptrain --until lower" in err and len(err.splitlines()) == 1
    assert main(["optimize", "--workdir", str(workdir), "--from", "uptrain"]) == 0
    capsys.readouterr()
    assert main(["lower", "--workdir", str(workdir)]) == 0
    assert "lower: up to date, skipped" in capsys.readouterr().err


def test_a_relative_workdir_reads_its_outputs(tmp_path, monkeypatch):
    """`--workdir runs/demo`, as README's first command gives it: a pass's outputs are found, not looked for under
    runs/demo/runs/demo."""
    from hwopt.run import Run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/demo/profile").mkdir(parents=True)
    (tmp_path / "runs/demo/profile/costs.json").write_text('{"source": "timed"}')
    run = Run("runs/demo", Settings())
    assert run.read_json(run.output("profile", "costs")) == {"source": "timed"}
