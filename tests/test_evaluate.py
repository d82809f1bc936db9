"""`hwopt evaluate`: a child against its parent, on a tiny random model (a layer's FFN removed, one attention
made linear), in-process."""

from __future__ import annotations

import json

import pytest
import torch

from hwopt.cli import main
from hwopt.evaluate import compare_layerwise, compare_on_heldout
from hwopt.model.checkpoint import load_checkpoint, save_nemotron_nas
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig
from hwopt.model.layerwise import LayerwiseParent
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.model_source import resolve_model
from hwopt.plugins import block_types
from hwopt.report import report_rows, speedup_line
from hwopt.targets import resolve_target

FAST = ["--scenario", "8/4", "--repeats", "1", "--seq-len", "16", "--tokens", "64"]


@pytest.fixture(scope="module")
def tiny_child_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny parent with layer 1's FFN removed and layer 2's attention replaced by a linear layer."""
    source = resolve_model(str(tiny_llama_dir))
    parent = source.load()
    blocks = list(parent.block_configs)
    blocks[1] = BlockConfig(blocks[1].attention, FFNConfig(no_op=True))
    blocks[2] = BlockConfig(AttentionConfig(replace_with_linear=True), blocks[2].ffn)
    child = HeteroLlamaForCausalLM(parent.config, blocks, parent.block_types)
    torch.manual_seed(0)
    state = child.state_dict()
    state.update({k: v for k, v in parent.state_dict().items() if k in state and v.shape == state[k].shape})
    child.load_state_dict(state)
    directory = tmp_path_factory.mktemp("tiny_child")
    save_nemotron_nas(child, directory, source.tokenizer())
    return directory


def test_evaluate_writes_report_with_every_figure(tiny_child_dir, tiny_llama_dir, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"question": f"Is {n} even?", "choices": ["yes", "no"],
                                          "answer": n % 2}) for n in range(6)))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_child_dir), "--parent", str(tiny_llama_dir), "--out", str(out),
                 "--task-data", str(task), "--threads", "1", *FAST]) == 0
    assert torch.get_num_threads() == 1
    report = json.loads((out / "evaluation.json").read_text())
    assert set(report["texts"]) == {"heldout", "general"}
    child, parent = load_checkpoint(tiny_child_dir, block_types()), load_checkpoint(tiny_llama_dir, block_types())
    for q in report["texts"].values():
        assert q["kl_div"] > 0 and 0 <= q["top1_agreement"] < 1 and q["perplexity"] > 1
    general = report["texts"]["general"]
    from hwopt.data import general_heldout

    ids = general_heldout(resolve_model(str(tiny_llama_dir)).tokenizer(), 16)
    assert general["tokens"] == ids.numel()
    assert general["kl_div"] == pytest.approx(compare_on_heldout(child, parent, ids)["kl_div"], rel=1e-4)
    assert report["child"]["params"] < report["parent"]["params"]
    assert report["child"]["weights_mib"] < report["parent"]["weights_mib"]
    # one layer's attention is linear: its KV cache is gone, so the child's is 3/4 of the parent's
    assert report["child"]["kv_cache_mib"] == pytest.approx(report["parent"]["kv_cache_mib"] * 3 / 4)
    assert report["measured_speedup"] > 0 and report["predicted_speedup"] > 1
    assert report["measured_error"] >= 0 and isinstance(report["measured_while_disturbed"], bool)
    assert f"± {report['measured_error']:.0%}" in speedup_line(report)
    assert report["parent"]["tokens_per_s"] == pytest.approx(1 * 12 / report["parent"]["runtime_ms_measured"] * 1e3)
    for role in ("parent", "child"):
        assert any(report[role]["task_accuracy"] == pytest.approx(n / 6) for n in range(7))
    assert report["predicted_on"] == "cpu (estimated)" and report["predicted_by"].startswith("estimated for ")
    assert max(len(row[0]) for row in report_rows(report)) < 60  # each row's label, as the table shows it
    assert len(speedup_line(report)) < 200
    markdown = (out / "report.md").read_text()
    assert "general English" in markdown and "per_layer.png" in markdown and "task accuracy" in markdown
    assert (out / "per_layer.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_a_comparison_a_layer_at_a_time_gives_the_whole_models_figures(tiny_child_dir, tiny_llama_dir):
    """Both read from disk a piece at a time, the child (layer 1 without FFN, layer 2's attention linear) against
    its parent: every figure of ``compare_on_heldout`` on the whole models, over a last batch that is short."""
    torch.manual_seed(1)
    ids = torch.randint(0, 49152, (7, 16))  # [sequences, tokens]: batches of 4 and 3
    child, parent = load_checkpoint(tiny_child_dir, block_types()), load_checkpoint(tiny_llama_dir, block_types())
    whole = compare_on_heldout(child, parent, ids)
    read = []
    streamed = [LayerwiseParent(d, block_types()) for d in (tiny_child_dir, tiny_llama_dir)]
    for source in streamed:
        layer = source.decoder_layer
        source.decoder_layer = lambda i, layer=layer: read.append(i) or layer(i)
    figures = compare_layerwise(*streamed, ids)
    assert figures.keys() == whole.keys() and whole["kl_div"] > 0 and whole["perplexity"] != whole["parent_perplexity"]
    assert figures == pytest.approx(whole, rel=1e-5)
    assert read == [*range(4), *range(4)]  # each layer of each model read once, the child's first
    assert compare_layerwise(child, parent, ids) == pytest.approx(whole, rel=1e-5)  # whole models stream too


def test_models_that_do_not_fit_together_are_compared_a_layer_at_a_time_and_not_timed(tiny_child_dir, tiny_llama_dir,
                                                                                       tmp_path, capsys):
    """Under a --max-memory that cannot hold both whole: the same quality figures, task accuracy included, each
    model read a layer at a time; parameters and memory from the architecture; the runtime said not measured."""
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"question": f"Is {n} odd?", "choices": ["yes", "no", "maybe"],
                                          "answer": n % 3}) for n in range(5)))
    reports = {}
    for budget in ("1MiB", "64GiB"):
        out = tmp_path / budget
        assert main(["evaluate", "--model", str(tiny_child_dir), "--parent", str(tiny_llama_dir), "--out", str(out),
                     "--task-data", str(task), "--threads", "1", "--max-memory", budget, *FAST]) == 0
        reports[budget] = json.loads((out / "evaluation.json").read_text())
    err = capsys.readouterr().err
    assert "report with parent and child whole memory plan per rank (1 rank, cpu, fp32)" in err
    streamed, whole = reports["1MiB"], reports["64GiB"]
    reason = streamed["runtime_not_measured"]
    assert "over --max-memory 1MiB" in reason and reason.endswith("; quality computed a layer at a time")
    assert f"runtime not measured: {reason}" in err and "runtime_not_measured" not in whole
    assert "measured_speedup" not in streamed and "runtime_ms_measured" not in streamed["child"]
    for name, q in whole["texts"].items():
        assert streamed["texts"][name] == pytest.approx(q, rel=1e-5)
    for role in ("parent", "child"):
        for key in ("params", "weights_mib", "kv_cache_mib", "memory_mib", "task_accuracy"):
            assert streamed[role][key] == pytest.approx(whole[role][key]), (role, key)
    assert ("runtime measured (ms)", "not measured", "not measured", "") in report_rows(streamed)
    assert speedup_line(streamed).endswith(f"runtime not measured ({reason})")
    markdown = (tmp_path / "1MiB" / "report.md").read_text()
    assert "| runtime measured (ms) | not measured | not measured |  |" in markdown and reason in markdown


def test_a_runs_closing_report_compares_models_that_do_not_fit_a_layer_at_a_time(tiny_child_dir, tiny_llama_dir,
                                                                                 tmp_path, capsys, monkeypatch):
    """``Run.report`` on a run whose uptrain, solve and lower are stand-ins (the tiny child, made-up totals): under
    --max-memory 1MiB quality a layer at a time and no runtime; a budget that fits is another report, timed. Few
    held-out tokens (the LM head over 49152 tokens is most of the time)."""
    import shutil

    from hwopt import run as run_module
    from hwopt.data import general_heldout
    from hwopt.pipeline import staged_pass
    from hwopt.run import Run
    from hwopt.settings import Settings

    monkeypatch.setattr(run_module, "EVALUATION_TOKENS", 64)
    monkeypatch.setattr(run_module, "general_heldout", lambda tokenizer, seq_len: general_heldout(tokenizer,
                                                                                                 seq_len)[:4])

    workdir = tmp_path / "run"
    with staged_pass(workdir / "uptrain", "fp-uptrain") as out:
        shutil.copytree(tiny_child_dir, out / "model")
    with staged_pass(workdir / "solve", "fp-solve") as out:
        (out / "solutions.json").write_text(json.dumps({
            "parent": {"totals": {"stats.memory_mib": 14.0, "stats.runtime_ms": 3.0}},
            "solutions": [{"totals": {"stats.memory_mib": 13.0, "stats.runtime_ms": 2.0}}]}))
    with staged_pass(workdir / "lower", "fp-lower") as out:
        (out / "stand-in").write_text("")
    reports = {}
    for budget in ("1MiB", None):
        settings = Settings(model=str(tiny_llama_dir), seq_len=16, scenario="8/4", threads=1, distill_samples=0,
                            max_memory=budget)
        reports[budget] = Run(workdir, settings).report()
    streamed, whole = reports["1MiB"], reports[None]
    assert "over --max-memory 1MiB" in streamed["runtime_not_measured"] and "measured_speedup" in whole
    assert streamed["predicted_speedup"] == 1.5 and streamed["child"]["memory_mib_predicted"] == 13.0
    for name, q in whole["texts"].items():
        assert streamed["texts"][name] == pytest.approx(q, rel=1e-5)
    assert "runtime not measured (report with parent and child whole needs" in capsys.readouterr().err
    assert Run(workdir, settings).report() == whole  # kept: nothing changed


@pytest.mark.parametrize("args, message", [
    (["--tokens", "8"], "--tokens 8 must hold at least one sequence"),
    (["--data", "no/such/file.txt"], "data file no/such/file.txt does not exist"),
    (["--threads", "9999"], "--threads 9999: this process may use"),
    (["--threads", "0"], "--threads 0: this process may use"),
])
def test_evaluate_bad_input_is_one_error_line(tiny_child_dir, tiny_llama_dir, tmp_path, capsys, args, message):
    code = main(["evaluate", "--model", str(tiny_child_dir), "--parent", str(tiny_llama_dir),
                 "--out", str(tmp_path / "e"), "--seq-len", "16", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "e").exists()


def test_a_measured_speedup_says_how_busy_other_processes_kept_the_cores(tiny_child_dir, tiny_llama_dir):
    from hwopt.evaluate import measured_speedup
    from hwopt.search_space import Scenario

    child, parent = load_checkpoint(tiny_child_dir, block_types()), load_checkpoint(tiny_llama_dir, block_types())
    check = measured_speedup(parent, child, Scenario(input_len=8, output_len=2), repeats=2)
    assert check["measured_speedup"] > 0 and check["error"] >= 0
    assert check["others"] >= 0 and isinstance(check["disturbed"], bool)


def _scripted_generations(monkeypatch, parent_ms: list[float], child_ms: list[float]):
    """``generation_timers`` replaced: each model's rounds take the scripted ms in turn (cycling), 2 ms of real
    time each, so that ``interleaved_rounds``' time limit on extra rounds applies."""
    import itertools
    import time

    import hwopt.evaluate

    def timers(models, scenario, vocab_size):
        def timer(script):
            cycle = itertools.cycle(script)
            return lambda: (time.sleep(0.002), [next(cycle)])[1]
        return {"parent": timer(parent_ms), "child": timer(child_ms)}
    monkeypatch.setattr(hwopt.evaluate, "generation_timers", timers)


def test_a_measured_speedup_pairs_each_round_and_times_more_rounds_until_it_is_precise(monkeypatch, tiny_llama_dir):
    """The machine's speed swings round by round and both models' with it: the speedup is the median of each
    round's ratio (1.43x), not the ratio of the two medians (200 / 130 = 1.54x); a precise ratio stops at
    ``repeats`` rounds (at least 5: fewer say little of their own scatter), a scattered one is timed for more."""
    from hwopt.evaluate import measured_speedup
    from hwopt.search_space import Scenario

    parent = load_checkpoint(tiny_llama_dir, block_types())
    _scripted_generations(monkeypatch, [100.0, 200.0, 300.0], [70.0, 130.0, 210.0])
    check = measured_speedup(parent, parent, Scenario(), repeats=3, precision=1.0)
    assert check["rounds"] == 5 and check["measured_speedup"] == pytest.approx(100 / 70)  # 3 asked, 5 timed
    assert check["measured_ms"] == {"parent": 200.0, "child": 130.0}
    _scripted_generations(monkeypatch, [150.0], [100.0])
    steady = measured_speedup(parent, parent, Scenario(), repeats=5)
    assert steady["rounds"] == 5 and steady["measured_speedup"] == 1.5 and steady["error"] == 0
    _scripted_generations(monkeypatch, [130.0, 170.0], [100.0])
    scattered = measured_speedup(parent, parent, Scenario(), repeats=5, precision=0.02)
    assert scattered["rounds"] > 5 and scattered["error"] > 0.02  # still imprecise when the time ran out


def test_a_runs_child_is_evaluated_with_the_runs_parent_data_and_scenario(tiny_child_dir, tiny_llama_dir, tmp_path,
                                                                         capsys):
    """`hwopt evaluate --model RUN/uptrain/model` alone: the parent, sequence length, target and scenario come from
    the run's run.json (an option given still wins), so its figures are those of the run's closing report."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_child_dir, run / "uptrain" / "model")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_llama_dir), "seq_len": 24, "scenario": "8/4",
                                              "target": "cpu", "data": None, "dtype": None, "backend": "roofline"}))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run / "uptrain" / "model"), "--out", str(out), "--repeats", "1",
                 "--tokens", "96", "--threads", "1"]) == 0
    assert (f"is in run {run}; from its run.json: parent {tiny_llama_dir}, seq len 24, target cpu, scenario 8/4, "
            "backend roofline" in capsys.readouterr().err)
    report = json.loads((out / "evaluation.json").read_text())
    assert report["texts"]["heldout"]["tokens"] == 96 and report["texts"]["general"]["source"].endswith(
        "in sequences of 24")
    from hwopt.data import general_heldout

    tokenizer = resolve_model(str(tiny_llama_dir)).tokenizer()
    in_sequences_of = {n: general_heldout(tokenizer, n).numel() for n in (16, 24)}
    assert in_sequences_of[24] != in_sequences_of[16]  # so the next line tells which sequence length was used
    assert report["texts"]["general"]["tokens"] == in_sequences_of[24]
    assert report["scenario"]["input_len"] == 8
    assert main(["evaluate", "--model", str(run / "uptrain" / "model"), "--out", str(out), "--repeats", "1",
                 "--tokens", "64", "--threads", "1", "--seq-len", "16", "--parent", str(tiny_llama_dir)]) == 0
    assert json.loads((out / "evaluation.json").read_text())["texts"]["general"]["tokens"] == in_sequences_of[16]


def test_a_runs_child_takes_its_predicted_runtimes_from_the_runs_profile(tiny_child_dir, tiny_llama_dir, tmp_path,
                                                                          capsys):
    """Where the run's profile covers every block of parent and child, for the same target, scenario, backend and
    threads, its costs are the predicted runtimes (a measuring backend took minutes to time them again)."""
    import shutil

    from hwopt.profiling import choose_backend, layer_rows, measure_costs, model_total, model_variants
    from hwopt.search_space import Scenario, model_sub_variants

    run = tmp_path / "run"
    shutil.copytree(tiny_child_dir, run / "uptrain" / "model")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_llama_dir), "seq_len": 24, "scenario": "8/4",
                                              "target": "cpu", "backend": "roofline", "threads": 1}))
    target = resolve_target("cpu")
    scenario = Scenario.for_target(target, "8/4", 1, None, None)
    child, parent = resolve_model(str(run / "uptrain" / "model")), resolve_model(str(tiny_llama_dir))
    blocks = {(v.kind, v.name): v for model in (child, parent) for pair in model_sub_variants(model) for v in pair}
    backend, label = choose_backend("roofline", target, scenario, False)
    costs = measure_costs(parent.architecture, list(blocks.values()), target, scenario, backend, label, 1, "profile")
    for kind in ("attention", "ffn"):  # ten times the roofline's: figures that tell where they came from
        for entry in costs[kind].values():
            entry.update({key: 10 * entry[key] for key in ("runtime_ms", "prefill_ms", "decode_ms", "ttft_ms")})
    (run / "profile").mkdir()
    (run / "profile" / "costs.json").write_text(json.dumps({"target": target.name, "scenario": scenario.to_json(),
                                                            "source": label, **costs}))  # as the profile writes it
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run / "uptrain" / "model"), "--out", str(out), "--repeats", "1",
                 "--tokens", "48"]) == 0
    assert f"the run's profile ({run / 'profile' / 'costs.json'}), not timed again" in capsys.readouterr().err
    report = json.loads((out / "evaluation.json").read_text())
    for role, model in (("parent", parent), ("child", child)):
        expected = model_total(costs, layer_rows(costs, model_variants(model)))["runtime_ms"]
        assert report[role]["runtime_ms_predicted"] == pytest.approx(expected)


def test_a_child_outside_a_run_needs_its_parent(tiny_child_dir, capsys):
    assert main(["evaluate", "--model", str(tiny_child_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hwopt: error: {tiny_child_dir} is not inside a run directory: say which model is its parent "
                   "(--parent)"]


def test_a_child_path_that_does_not_exist_is_said_to_be_unknown(tmp_path, capsys):
    missing = tmp_path / "runs" / "demo" / "lower" / "nemotorn-nas"
    assert main(["evaluate", "--model", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"unknown model '{missing}': not a directory or config.json" in err[0]


def test_a_slow_throughput_keeps_its_decimals():
    from hwopt.search_space import Scenario

    assert [Scenario.tokens_per_s_text(x) for x in (0.4236, 42.17, 36317.2)] == ["0.424", "42.2", "36,317"]
    report = {"parent": {"params": 10, "tokens_per_s": 0.4236}, "child": {"params": 5, "tokens_per_s": 0.8472},
              "texts": {}}
    assert ("tokens/s measured", "0.424", "0.847", "2.000") in report_rows(report)
