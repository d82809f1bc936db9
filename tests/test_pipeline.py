"""The pass pipeline on a tiny random Llama: skipping, resuming, errors, plugins, round trips."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_RUN, REPO, env_with_pythonpath, hwopt_cli
from safetensors.torch import load_file

from hwopt.errors import HwoptError
from hwopt.model.checkpoint import load_checkpoint, save_nemotron_nas
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig
from hwopt.model.modeling import HeteroLlamaForCausalLM, KVCache, PreallocatedKVCache
from hwopt.model.modeling_nemotron_nas import grouped_decode_attention
from hwopt.model_source import load_model
from hwopt.pipeline import READABLE
from hwopt.plugins import block_types


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hwopt: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """One complete optimize run on the tiny model."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    proc = hwopt_cli("optimize", "--model", tiny_llama_dir, "--workdir", workdir, "--speedup", "1.2", *FAST_RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run for a test that changes its settings."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_optimize_writes_every_artifact(tiny_run):
    for path in ("profile/costs.json", "library/index.json", "score/block_library.json", "solve/solutions.json",
                 "uptrain/model/config.json", "lower/nemotron-nas/config.json", "lower/nemotron-nas/model.safetensors",
                 "report.json"):
        assert (tiny_run / path).is_file(), path
        # as open() would create them under the user's umask, not tempfile's or safetensors' 0600
        assert (tiny_run / path).stat().st_mode & 0o777 == READABLE, path
    assert (tiny_run / "run.json").stat().st_mode & 0o777 == READABLE
    assert not list(tiny_run.glob("*.partial"))
    report = json.loads((tiny_run / "report.json").read_text())
    for side in ("parent", "child"):
        assert set(report[side]) >= {"params", "memory_mib", "memory_mib_predicted", "runtime_ms_predicted",
                                     "runtime_ms_measured", "tokens_per_s"}
    assert set(report["texts"]) == {"heldout", "general"}
    checks = json.loads((tiny_run / "solve/speedup_checks.json").read_text())
    assert 1 <= len(checks) <= 3  # the target is this CPU: the chosen child was timed
    assert all(c["measured_speedup"] < 1.2 for c in checks[:-1])  # a re-solve only after a child measured slower
    for earlier, later in zip(checks, checks[1:]):
        assert later["budget_speedup"] == pytest.approx(
            earlier["budget_speedup"] * 1.2 / earlier["measured_speedup"])
    kept = max(checks, key=lambda c: c["measured_speedup"]) if checks[-1]["measured_speedup"] < 1.2 else checks[-1]
    for quality in report["texts"].values():
        assert quality["kl_div"] >= 0 and quality["perplexity"] > 1 and quality["parent_perplexity"] > 1
    solution = json.loads((tiny_run / "solve/solutions.json").read_text())
    best, parent = solution["solutions"][0], solution["parent"]
    assert best["predicted_speedup"] == pytest.approx(kept["predicted_speedup"])  # the child measured, kept
    assert best["totals"]["stats.runtime_ms"] <= parent["totals"]["stats.runtime_ms"] / 1.2 * (1 + 1e-6)
    config = json.loads((tiny_run / "lower/nemotron-nas/config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and len(config["block_configs"]) == 4
    assert [b for b in config["block_configs"]] == best["blocks"]


def test_costs_name_their_source(tiny_run):
    costs = json.loads((tiny_run / "profile/costs.json").read_text())
    for kind in ("attention", "ffn"):
        for entry in costs[kind].values():
            assert entry["source"]["kind"] == "measured" and "torch" in entry["source"]["backend"]
    library = json.loads((tiny_run / "score/block_library.json").read_text())
    for variants in library.values():
        for entry in variants.values():
            assert entry["stats"]["source"].startswith("measured on")
            assert entry["metrics"]["kl_div"] >= 0
        assert sum(e["parent"] for e in variants.values()) == 1
        assert next(e for e in variants.values() if e["parent"])["metrics"]["kl_div"] == pytest.approx(0, abs=1e-6)


def test_rerun_skips_every_pass(tiny_run):
    """The profile is left out: whether it is skipped depends on whether it passed its checks on this machine's
    load (tests/test_timing.py checks both ways on fake timings)."""
    proc = hwopt_cli("optimize", "--workdir", tiny_run, "--from", "library")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("library", "score", "solve", "uptrain", "lower"):
        assert f"{name}: up to date, skipped" in proc.stderr


def test_changed_budget_reruns_from_solve(run_copy):
    proc = hwopt_cli("solve", "--workdir", run_copy, "--speedup", "1.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    solution = json.loads((run_copy / "solve/solutions.json").read_text())
    assert solution["constraints"][0].startswith("stats.runtime_ms <=")
    assert "up to date" not in proc.stderr


def test_solves_speed_check_refuses_in_one_line_when_parent_and_child_do_not_fit_whole(run_copy):
    """The speed check times parent and child whole: under a --max-memory they exceed, solve stops before it starts
    and says how to solve without it; with --speedup-checks 0 it solves, and keeps the MIP's child where
    distilling the candidates would not fit either, saying so."""
    proc = hwopt_cli("solve", "--workdir", run_copy, "--speedup", "1.1", "--max-memory", "1MiB")
    assert_one_error_line(proc, "solve's speed check (parent and child whole, timed) needs", "--max-memory 1MiB",
                          "give --speedup-checks 0")
    proc = hwopt_cli("solve", "--workdir", run_copy, "--speedup", "1.1", "--max-memory", "1MiB",
                     "--speedup-checks", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "candidates not compared, the MIP's child kept: distilling a candidate child needs" in proc.stderr
    assert json.loads((run_copy / "solve/speedup_checks.json").read_text()) == []
    assert "selection" not in json.loads((run_copy / "solve/solutions.json").read_text())


def test_solve_keeps_the_candidate_closest_on_validation_english_and_uptrain_trains_it(tiny_run):
    """The MIP's child and the layer-dropping child as fast, each briefly distilled, ordered by validation KL; the
    first is the child uptrain trained and lowered."""
    result = json.loads((tiny_run / "solve/solutions.json").read_text())
    kls = result["selection"]["candidates"]
    assert set(kls) == {"mip", "layer_drop"} and result["selection"]["tokens"] == 128
    ordered = [solution["validation_kl"] for solution in result["solutions"]]
    assert ordered == sorted(kls.values()) and all(kl > 0 for kl in ordered)
    by_name = {solution["candidate"]: solution for solution in result["solutions"]}
    assert by_name["mip"]["solver"] == "scip" and by_name["layer_drop"]["solver"] == "layer_drop"
    # the layer-dropping child: each layer removed whole or the parent's own, no slower than the MIP's child
    library = json.loads((tiny_run / "score/block_library.json").read_text())
    parent = [next((e["attention"], e["ffn"]) for e in library[f"layer_{i}"].values() if e["parent"])
              for i in range(len(library))]
    removed = [tuple(v) == ("attn_noop", "ffn_noop") for v in by_name["layer_drop"]["variants"]]
    assert any(removed) and all(gone or tuple(v) == own for gone, v, own
                                in zip(removed, by_name["layer_drop"]["variants"], parent, strict=True))
    assert by_name["layer_drop"]["totals"]["stats.runtime_ms"] <= by_name["mip"]["totals"]["stats.runtime_ms"]
    lowered = json.loads((tiny_run / "lower/nemotron-nas/config.json").read_text())["block_configs"]
    assert [block["ffn"]["no_op"] for block in lowered] == [block["ffn"]["no_op"]
                                                          for block in result["solutions"][0]["blocks"]]
    report = json.loads((tiny_run / "report.json").read_text())  # the closing report names the candidate kept
    assert report["child_candidate"] == {"name": result["solutions"][0]["candidate"], "validation_kl": kls}


def test_memory_budget_is_respected(run_copy):
    run = run_copy
    parent = json.loads((run / "solve/solutions.json").read_text())["parent"]["totals"]
    outside = json.loads((run / "profile/costs.json").read_text())["outside_layers"]["memory_mib"]
    budget = outside + 0.3 * (parent["stats.memory_mib"] - outside)  # the layers at 30% of their memory
    proc = hwopt_cli("solve", "--workdir", run, "--memory", f"{budget:.4f}MiB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run / "solve/solutions.json").read_text())
    assert "selection" in result  # every candidate, the layer-dropping child too, within the budget
    assert all(s["totals"]["stats.memory_mib"] <= budget + 1e-3 for s in result["solutions"])
    assert all(s["totals"]["stats.runtime_ms"] <= parent["stats.runtime_ms"] / 1.2 * (1 + 1e-6)  # the saved budget
               for s in result["solutions"])


def test_lowered_checkpoint_reloads_with_identical_logits(tiny_run):
    uptrained = load_checkpoint(tiny_run / "uptrain/model", block_types())
    lowered = load_model(str(tiny_run / "lower/nemotron-nas"))
    ids = torch.randint(0, 49152, (2, 12))
    with torch.no_grad():
        assert torch.equal(uptrained(ids).logits, lowered(ids).logits)


def test_lower_writes_the_nemotron_nas_checkpoint_without_loading_the_child_whole(run_copy, monkeypatch, capsys):
    """nemotron-nas streams (``Format.streams``): the lower pass reads the uptrained child a piece at a time, so
    a loader of whole models is never called, and writes the same weights. It says where they are."""
    import hwopt.model.checkpoint
    from hwopt.cli import main

    def whole(*args, **kwargs):
        raise AssertionError("the lower pass loaded the child whole")

    before = load_file(run_copy / "lower/nemotron-nas/model.safetensors")
    monkeypatch.setattr(hwopt.model.checkpoint, "load_checkpoint", whole)
    assert main(["lower", "--workdir", str(run_copy), "--force"]) == 0
    assert f"the child: {run_copy / 'lower/nemotron-nas'}\n" in capsys.readouterr().err
    after = load_file(run_copy / "lower/nemotron-nas/model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_kill_during_library_resumes_to_the_same_result(tiny_llama_dir, tiny_run, tmp_path):
    workdir = tmp_path / "killed"
    args = [sys.executable, "-m", "hwopt", "optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir),
            "--speedup", "1.2", *FAST_RUN]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = workdir / "library.partial"
    deadline = time.time() + 300
    while len(list(partial.rglob("*.safetensors"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed during library"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "library").exists() and partial.is_dir()
    done_before = {p.name for p in partial.rglob("*.safetensors")}

    rerun = hwopt_cli(*args[3:])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(workdir.glob("*.partial"))
    # same library and scores as the uninterrupted run (costs are timings, so they may differ)
    assert done_before <= {p.name for p in (workdir / "library").rglob("*.safetensors")}
    for f in (tiny_run / "library").rglob("*.safetensors"):
        assert (workdir / "library" / f.relative_to(tiny_run / "library")).read_bytes() == f.read_bytes(), f
    scores = [json.loads((w / "score/block_library.json").read_text()) for w in (tiny_run, workdir)]
    metrics = [{(layer, v, m): x for layer, vs in s.items() for v, e in vs.items() for m, x in e["metrics"].items()}
               for s in scores]
    assert metrics[0] == pytest.approx(metrics[1])


@pytest.mark.parametrize("args, needles", [
    (["--model", "no-such-model"], ["unknown model 'no-such-model'"]),
    (["--target", "no-such-target"], ["unknown target 'no-such-target'"]),
    (["--data", "/no/such/file.txt"], ["data file /no/such/file.txt does not exist"]),
    (["--scenario", "12x4"], ["--scenario takes INPUT/OUTPUT"]),
    (["--target", "h100", "--require-measured"], ["--require-measured", "no GPU here"]),
    (["--target", "h100", "--backend", "torch"], ["cannot profile on h100-sxm", "no GPU here"]),
    (["--target", "a100", "--dtype", "fp8"], ["a100-80gb has no fp8"]),
    (["--kv-dtype", "int3"], ["unknown --kv-dtype 'int3'"]),
])
def test_bad_input_is_one_error_line(args, needles, tiny_llama_dir, tmp_path):
    model = [] if "--model" in args else ["--model", tiny_llama_dir]
    proc = hwopt_cli("optimize", *model, "--workdir", tmp_path, "--speedup", "1.5", *FAST_RUN, *args)
    assert_one_error_line(proc, *needles)


def test_infeasible_speedup_says_how_close_the_library_gets(run_copy):
    proc = hwopt_cli("solve", "--workdir", run_copy, "--speedup", "100")
    assert_one_error_line(proc, "no architecture in the library meets the budgets", "stats.runtime_ms <=",
                          "the fastest child in the library is")


def test_weights_missing_for_a_named_model_is_one_error_line(tmp_path):
    proc = hwopt_cli("library", "--model", "llama-3.1-70b", "--workdir", tmp_path,
                     env=env_with_pythonpath() | {"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert_one_error_line(proc, "no weights for llama-3.1-70b", "Hugging Face cache")


def test_plugin_metric_is_scored_and_solvable(installed_js_plugin, tiny_llama_dir, tmp_path):
    env = env_with_pythonpath(installed_js_plugin)
    proc = hwopt_cli("optimize", "--model", tiny_llama_dir, "--workdir", tmp_path, "--until", "solve",
                     "--metric", "kl_div", "--metric", "js_div", "--objective", "metrics.js_div",
                     "--speedup", "1.2", *FAST_RUN, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    library = json.loads((tmp_path / "score/block_library.json").read_text())
    for variants in library.values():
        for entry in variants.values():
            assert 0 <= entry["metrics"]["js_div"] <= 0.6932
    assert json.loads((tmp_path / "solve/solutions.json").read_text())["objective"] == "metrics.js_div"
    listing = hwopt_cli("plugins", env=env)
    assert "js_divergence" in listing.stdout and "js_div" in listing.stdout


def mixed_child(seed=0) -> HeteroLlamaForCausalLM:
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=97, tie_word_embeddings=False)
    blocks = [BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=64)),
              BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(no_op=True)),
              BlockConfig(AttentionConfig(no_op=True), FFNConfig(replace_with_linear=True)),
              BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=128))]
    return HeteroLlamaForCausalLM(config, blocks, block_types()).eval()


def test_child_checkpoint_round_trip(tmp_path):
    child = mixed_child()
    save_nemotron_nas(child, tmp_path)
    again = load_model(str(tmp_path))
    assert again.block_configs == child.block_configs
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(child(ids).logits, again(ids).logits)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.self_attn.linear_attn.weight" in names
    assert "model.layers.2.mlp.linear_mlp.weight" in names
    assert not any(n.startswith("model.layers.2.input_layernorm") for n in names)  # no-op has no norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_class", [KVCache, PreallocatedKVCache])
def test_kv_cache_decoding_matches_full_forward(cache_class, dtype):
    """Decoding a token at a time gives the full forward's logits, with either cache; in bf16 on the CPU the
    one-token steps take ``grouped_decode_attention`` rather than SDPA."""
    child = mixed_child(1).to(dtype)
    ids = torch.randint(0, 97, (2, 10))
    cache = KVCache(child.num_layers) if cache_class is KVCache else PreallocatedKVCache(child.num_layers, 10)
    with torch.no_grad():
        full = child(ids).logits.float()
        out = child(ids[:, :6], past_key_values=cache)
        steps = [out.logits]
        for t in range(6, 10):
            out = child(ids[:, t:t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    assert out.past_key_values is cache and cache.length == 10
    tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bf16 keeps 8 bits of mantissa
    assert torch.allclose(torch.cat(steps, dim=1).float(), full, atol=tolerance)
    if cache_class is PreallocatedKVCache:
        with pytest.raises(HwoptError, match="holds 10 tokens, not 11"):
            child(ids[:, :1], past_key_values=cache)


def test_grouped_decode_attention_is_sdpa_with_grouped_query_heads():
    q, k, v = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)  # 3 query heads per KV head
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(grouped_decode_attention(q, k, v), expected, atol=1e-6)


def test_profile_needs_only_the_config_and_library_says_where_weights_are_missing(tmp_path):
    """A nemotron-nas config.json alone is enough to profile; the weight-hungry passes stop clearly."""
    from hwopt.model.checkpoint import nemotron_nas_config

    model_dir = tmp_path / "config-only"
    model_dir.mkdir()
    child = mixed_child()
    config = nemotron_nas_config(child.config, child.block_configs, block_types())
    (model_dir / "config.json").write_text(json.dumps(config))
    workdir = tmp_path / "run"
    proc = hwopt_cli("profile", "--model", model_dir, "--workdir", workdir, "--scenario", "8/4", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    costs = json.loads((workdir / "profile/costs.json").read_text())
    # the child's own blocks are profiled even where they lie outside the default search space
    assert {"kv1", "kv2", "attn_linear", "attn_noop"} <= set(costs["attention"])
    assert {"ffn64", "ffn128", "ffn_linear", "ffn_noop"} <= set(costs["ffn"])
    assert costs["attention"]["kv1"]["kv_cache_mib"] < costs["attention"]["kv2"]["kv_cache_mib"]
    proc = hwopt_cli("library", "--workdir", workdir)
    assert_one_error_line(proc, "no *.safetensors")


def test_checkpoint_without_tokenizer_is_one_error_line(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "no-tokenizer"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_bytes((tiny_llama_dir / name).read_bytes())
    proc = hwopt_cli("library", "--model", model_dir, "--workdir", tmp_path / "run", *FAST_RUN)
    assert_one_error_line(proc, f"cannot load a tokenizer from {model_dir}")


def test_training_in_bf16_on_the_cpu_times_and_compares_in_the_scenarios_dtype(tiny_run, run_copy):
    """library, score and uptrain in bf16 (as on a CPU with native bf16), the scenario fp32: the closing report
    holds both models in fp32, so the parent's perplexity is the fp32 run's to the last digit, and the child
    is written in fp32 as it was trained."""
    proc = hwopt_cli("optimize", "--workdir", run_copy, "--train-dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = (json.loads((run / "report.json").read_text()) for run in (tiny_run, run_copy))
    assert after["measured_on"].startswith("cpu (") and ", fp32, torch" in after["measured_on"]
    for name, quality in after["texts"].items():
        assert quality["parent_perplexity"] == before["texts"][name]["parent_perplexity"]
    assert after["child"]["weights_mib"] == pytest.approx(after["child"]["params"] * 4 / 2**20)  # fp32 in memory
    trained = json.loads((run_copy / "run.json").read_text())
    assert trained["train_dtype"] == "bf16"
    weights = [t for path in (run_copy / "uptrain/model").glob("*.safetensors") for t in load_file(path).values()]
    assert weights and {t.dtype for t in weights} == {torch.float32}
