"""Profile: scenario arithmetic, targets, backend choice and labels, the torch backend, and ``hwopt estimate``."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from conftest import hwopt_cli
from transformers import LlamaConfig

from hwopt import targets
from hwopt.builtin import backend_torch
from hwopt.errors import HwoptError
from hwopt.model.checkpoint import nemotron_nas_config
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig
from hwopt.model.modeling import DecoderLayer, KVCache
from hwopt.model_source import resolve_model
from hwopt.plugins import backends, block_types
from hwopt.profiling import choose_backend, cost_entry
from hwopt.search_space import Scenario, sub_variant_of
from hwopt.steps import build_step, step_inputs
from hwopt.targets import resolve_target
from hwopt.workload import Phase, Workload, integrate_decode, phase_totals, scenario_phases

TINY = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512)


# --- scenario arithmetic ----------------------------------------------------------------------------------------

def test_phases_of_a_serving_scenario():
    scenario = Scenario.parse("128/1024", batch=64, dtype="bf16")
    assert scenario.decode_steps == 1023 and scenario.max_context == 1152
    assert scenario_phases(scenario) == (
        Phase("prefill", 64, 128, 0),
        Phase("decode", 64, 1, 128), Phase("decode", 64, 1, 639), Phase("decode", 64, 1, 1150))
    assert scenario_phases(Scenario.parse("16/1")) == (Phase("prefill", 1, 16, 0),)  # prefill gives the only token


def test_decode_is_summed_over_every_step():
    scenario = Scenario.parse("128/1024", batch=64)
    contexts = [128, 639, 1150]
    step_ms = [0.5 + 0.002 * c for c in contexts]  # a step costs more as the cache grows
    by_hand = 1023 * 0.5 + 0.002 * (128 + 1150) * 1023 / 2  # steps see contexts 128 .. 1150
    assert integrate_decode(contexts, step_ms, scenario) == pytest.approx(by_hand)
    workload = Workload(None, TINY, "bf16", "bf16", scenario_phases(scenario))
    totals = phase_totals(workload, [40.0, *step_ms], scenario)
    assert totals["prefill_ms"] == totals["ttft_ms"] == 40.0
    assert totals["runtime_ms"] == pytest.approx(40.0 + by_hand)
    assert totals["decode_step_ms"] == {"128": step_ms[0], "639": step_ms[1], "1150": step_ms[2]}


def test_throughput_counts_input_and_output_tokens():
    scenario = Scenario.parse("128/1024", batch=64)
    assert scenario.runtime_ms_for_throughput(6472) == pytest.approx(64 * 1152 / 6472 * 1000)
    assert scenario.throughput(scenario.runtime_ms_for_throughput(6472)) == pytest.approx(6472)


def test_memory_is_weights_plus_kv_cache_at_the_longest_context_in_their_dtypes():
    config = resolve_model("llama-3.1-70b").config
    scenario = Scenario.parse("128/1024", batch=64, dtype="fp8", kv_dtype="bf16")
    kv8 = sub_variant_of(config, AttentionConfig(n_heads_in_group=8))
    entry = cost_entry(kv8, config, scenario, {"runtime_ms": 1.0}, {})
    params = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 8192  # Q, O; K, V for 8 KV heads of 128; the norm
    assert entry["num_params"] == params
    assert entry["weights_mib"] == pytest.approx(params * 1 / 2**20)  # fp8: one byte
    kv_bytes = 64 * 1152 * 2 * 8 * 128 * 2  # batch x context x (K and V) x heads x head_dim x bf16
    assert entry["kv_cache_mib"] == pytest.approx(kv_bytes / 2**20)
    assert entry["memory_mib"] == pytest.approx(entry["weights_mib"] + entry["kv_cache_mib"])


@pytest.mark.parametrize("args, message", [
    (("12x4",), "--scenario takes INPUT/OUTPUT"),
    (("0/4",), "must be positive"),
    (("16/4", 1, "int4"), "unknown --dtype 'int4'"),
    (("16/4", 1, "bf16", "fp6"), "unknown --kv-dtype 'fp6'"),
])
def test_bad_scenarios(args, message):
    with pytest.raises(HwoptError, match=message):
        Scenario.parse(*args)


# --- targets ----------------------------------------------------------------------------------------------------

def test_auto_target_is_the_gpu_nvml_sees_else_the_cpu(monkeypatch):
    monkeypatch.setattr(targets, "nvml_gpu_name", lambda: None)
    assert resolve_target("auto").name == "cpu"
    monkeypatch.setattr(targets, "nvml_gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    assert resolve_target("auto").name == "h100-sxm"
    monkeypatch.setattr(targets, "nvml_gpu_name", lambda: "NVIDIA GeForce RTX 4090")
    assert resolve_target("auto").name == "rtx-4090"
    monkeypatch.setattr(targets, "nvml_gpu_name", lambda: "Tesla K80")
    with pytest.raises(HwoptError, match="NVML sees 'Tesla K80', which no target recognises"):
        resolve_target("auto")


def test_nvml_without_a_driver_means_no_gpu():
    assert targets.nvml_gpu_name() is None  # this machine has no NVIDIA driver


def test_targets_lists_every_profile_with_its_specs():
    proc = hwopt_cli("targets")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(lines) == {"cpu", "h100-sxm", "h200-sxm", "a100-80gb", "rtx-4090"}
    assert "131.3 GiB, 4800 GB/s" in lines["h200-sxm"]
    assert "74.5 GiB, 3350 GB/s, bf16/fp16/fp8/fp32; aliases: h100" in lines["h100-sxm"]
    assert "bf16/fp16/fp32" in lines["a100-80gb"] and "fp8" not in lines["a100-80gb"]
    assert "cores available" in lines["cpu"]


def test_dtypes_a_target_lacks_are_errors():
    a100, h100, cpu = resolve_target("a100"), resolve_target("h100"), resolve_target("cpu")
    with pytest.raises(HwoptError, match="a100-80gb has no fp8 .--dtype.; it computes in bf16, fp16, fp32"):
        a100.check_dtype("fp8")
    h100.check_dtype("fp8")
    with pytest.raises(HwoptError, match="cpu has no fp16"):
        cpu.check_dtype("fp16")
    assert (h100.default_dtype(), cpu.default_dtype()) == ("bf16", "fp32")


# --- backends ---------------------------------------------------------------------------------------------------

def test_auto_backend_measures_on_the_cpu():
    backend, label = choose_backend("auto", resolve_target("cpu"), Scenario.parse("16/4"))
    assert backend.name == "torch" and label["kind"] == "measured"
    assert label["summary"].startswith("measured on") and "wall clock" in label["method"]


def test_auto_backend_estimates_a_gpu_that_is_absent_and_says_why():
    backend, label = choose_backend("auto", resolve_target("h100"), Scenario.parse("128/1024", 64, "bf16"))
    assert backend.name == "roofline" and not backend.measures
    assert label["kind"] == "estimated"
    assert label["reason"].startswith("not measured: torch: no GPU here")
    assert label["summary"].startswith("estimated for NVIDIA H100")


def test_an_estimate_asked_for_says_what_it_is_and_how_it_is_made():
    _, label = choose_backend("roofline", resolve_target("h100"), Scenario.parse("128/64", 1, "bf16"))
    assert label["reason"] == ("not measured: the roofline backend estimates (--backend torch measures, on a target "
                               "that is this machine)")
    assert "each block takes the longer of its FLOPs at the peak rate and its bytes at the memory bandwidth" in (
        label["summary"])


def test_require_measured_refuses_an_estimate():
    with pytest.raises(HwoptError, match="--require-measured: backend roofline only estimates.*no GPU here"):
        choose_backend("auto", resolve_target("h100"), Scenario.parse("16/4", 1, "bf16"), require_measured=True)
    with pytest.raises(HwoptError, match="cannot profile on h100-sxm .* with backend torch: no GPU here"):
        choose_backend("torch", resolve_target("h100"), Scenario.parse("16/4", 1, "bf16"))


def _tiny_workload(cfg, scenario: Scenario) -> Workload:
    return Workload(sub_variant_of(TINY, cfg), TINY, scenario.dtype, scenario.kv_dtype, scenario_phases(scenario))


def test_torch_backend_times_every_phase_and_a_no_op_costs_nothing():
    scenario, cpu = Scenario.parse("16/4"), resolve_target("cpu")
    torch_backend = backends().get("torch")
    for cfg in (AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=64),
                FFNConfig(replace_with_linear=True)):
        timer = torch_backend.prepare(_tiny_workload(cfg, scenario), cpu)
        for _ in range(2):  # a timer's every call is one round
            ms = timer()
            assert len(ms) == 4 and all(0 < t < 1000 for t in ms)
    assert torch_backend.prepare(_tiny_workload(FFNConfig(no_op=True), scenario), cpu)() == [0.0] * 4


def test_a_wall_clock_round_makes_whole_passes_lasting_at_least_min_round_ms(monkeypatch):
    clock = {"now": 0.0, "calls": 0}

    def one_ms_call():
        clock["now"] += 1e-3
        clock["calls"] += 1

    monkeypatch.setattr(backend_torch.time, "perf_counter", lambda: clock["now"])
    timer = backend_torch.wall_clock_timer([[(one_ms_call, ())] * 3])  # one phase, a rotation of 3 calls
    assert clock["calls"] == backend_torch.WARMUP + 3  # warm-up, then one pass to size the rounds
    clock["calls"] = 0
    assert timer() == [pytest.approx(1.0)]
    assert clock["calls"] == 3 * math.ceil(backend_torch.MIN_ROUND_MS / 3)  # 7 passes of 3 ms make 21 ms


@torch.inference_mode()
def test_the_timed_attention_step_computes_what_the_model_layer_computes():
    """What profile times is the real work: a decode step of the sub-block equals the model layer's."""
    torch.manual_seed(0)
    scenario = Scenario.parse("8/4")
    workload = _tiny_workload(AttentionConfig(n_heads_in_group=2), scenario)
    step = build_step(workload)
    phase = workload.phases[1]
    x, cos, sin, past_k, past_v = step_inputs(workload, phase)
    y, keys, values = step(x, cos, sin, past_k, past_v)
    block = BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(no_op=True))
    layer = DecoderLayer.from_parts(block, step.block, step.norm, None, None)
    cache = KVCache(1)
    cache.keys[0], cache.values[0], cache.length = past_k, past_v, phase.cached
    assert torch.equal(layer(x, (cos, sin), cache, 0), y)
    assert keys.shape[2] == phase.cached + 1 and torch.equal(cache.keys[0], keys)


# --- the commands -----------------------------------------------------------------------------------------------

def test_profile_a_70b_on_an_absent_h100_estimates_every_figure_quickly(tmp_path):
    start = time.perf_counter()
    proc = hwopt_cli("profile", "--workdir", tmp_path, "--target", "h100", "--model", "llama-3.1-70b",
                     "--scenario", "128/1024", "--batch", "64")
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 120
    costs = json.loads((tmp_path / "profile/costs.json").read_text())
    entries = [*costs["attention"].values(), *costs["ffn"].values(), costs["outside_layers"]]
    assert len(entries) == 6 + 6 + 1  # kv8, kv4, kv2, kv1, linear, no-op; 4 widths, linear, no-op; outside
    for entry in entries:
        assert entry["source"]["kind"] == "estimated" and "no GPU here" in entry["source"]["reason"]
    assert costs["scenario"] == {"batch": 64, "input_len": 128, "output_len": 1024, "dtype": "bf16",
                                 "kv_dtype": "bf16"}
    parent = costs["attention"]["kv8"]["runtime_ms"] + costs["ffn"]["ffn28672"]["runtime_ms"]
    assert costs["attention"]["kv1"]["runtime_ms"] < costs["attention"]["kv8"]["runtime_ms"] < parent
    assert "profile: 13 pieces estimated for NVIDIA H100" in proc.stderr  # says what it wrote, as a measured one does
    assert "(not measured: torch: no GPU here" in proc.stderr


def _nemotron_child_config(path):
    """A Llama-3.1-70B-shaped child: half the layers keep one KV head and a narrower FFN, some lose attention."""
    config = resolve_model("llama-3.1-70b").config
    blocks = [BlockConfig(AttentionConfig(n_heads_in_group=8), FFNConfig(intermediate_size=28672))] * 40 + \
             [BlockConfig(AttentionConfig(n_heads_in_group=64), FFNConfig(intermediate_size=14336))] * 30 + \
             [BlockConfig(AttentionConfig(no_op=True), FFNConfig(intermediate_size=14336))] * 10
    path.write_text(json.dumps(nemotron_nas_config(config, blocks, block_types())))
    return path


def test_estimate_json_for_a_model_name_and_for_a_nemotron_nas_config(tmp_path):
    proc = hwopt_cli("estimate", "--target", "h100", "--model", "llama-3.1-70b", "--json")
    assert proc.returncode == 0, proc.stderr
    parent = json.loads(proc.stdout)
    assert parent["target"] == "h100-sxm" and parent["source"]["kind"] == "estimated"
    assert len(parent["layers"]) == 80 and {r["attention"] for r in parent["layers"]} == {"kv8"}
    total = parent["total"]
    assert total["runtime_ms"] == pytest.approx(parent["outside_layers"]["runtime_ms"]
                                                + sum(r["runtime_ms"] for r in parent["layers"]))
    assert total["num_params"] == pytest.approx(70.55e9, rel=0.01)
    assert total["tokens_per_s"] == pytest.approx(1 * 192 / total["runtime_ms"] * 1000)

    child_path = _nemotron_child_config(tmp_path / "config.json")
    proc = hwopt_cli("estimate", "--target", "h100", "--model", child_path, "--json")
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout)
    assert [r["attention"] for r in child["layers"][38:42]] == ["kv8", "kv8", "kv1", "kv1"]
    assert child["layers"][75]["attention"] == "attn_noop" and child["layers"][75]["attention_ms"] == 0
    assert child["total"]["runtime_ms"] < total["runtime_ms"] and child["total"]["num_params"] < total["num_params"]


def test_estimate_compares_with_a_parent_and_draws_the_layers(tmp_path):
    child_path = _nemotron_child_config(tmp_path / "config.json")
    proc = hwopt_cli("estimate", "--target", "4090", "--model", child_path, "--parent", "llama-3.1-70b",
                     "--scenario", "128/128", "--plot", tmp_path / "layers.png")
    assert proc.returncode == 0, proc.stderr
    assert "the throughput" in proc.stdout and "does NOT fit" in proc.stdout  # 70B on a 24 GB card
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--target", "a100", "--dtype", "fp8"], "a100-80gb has no fp8"),
    (["--target", "h100", "--backend", "torch"], "no GPU here"),
    (["--target", "h100", "--model", "/no/such/config.json"], "unknown model '/no/such/config.json'"),
])
def test_estimate_errors_are_one_line(args, message):
    model = [] if "--model" in args else ["--model", "llama-3.1-8b"]
    proc = hwopt_cli("estimate", *model, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
