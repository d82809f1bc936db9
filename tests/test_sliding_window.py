"""The example block-type plugin hwopt-sliding-window, registered in-process (and, in one test, pip-installed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import env_with_pythonpath, hwopt_cli
from transformers import LlamaConfig

from hwopt.errors import HwoptError
from hwopt.estimate import estimate
from hwopt.model.architecture import architecture_from_dict
from hwopt.model.checkpoint import nemotron_nas_config
from hwopt.model.config import AttentionConfig, BlockConfig, parent_block_config
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.model_source import resolve_model
from hwopt.plugins import block_types
from hwopt.profiling import cost_entry
from hwopt.roofline import CostTerms, attended_pairs
from hwopt.search_space import Scenario, SearchSpace, sub_variant_of, sub_variants
from hwopt.targets import resolve_target
from hwopt.workload import Phase


def tiny_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=256)


def window_blocks(module, config, window: int) -> list[BlockConfig]:
    parent = parent_block_config(config)
    return [parent, BlockConfig(module.SlidingWindowConfig(2, window), parent.ffn), parent]


def test_window_entry_is_written_as_nemotron_nas_spells_it_and_read_back(sliding_window):
    config = tiny_config()
    blocks = window_blocks(sliding_window, config, 8)
    raw = json.loads(json.dumps(nemotron_nas_config(config, blocks, block_types())))
    assert raw["block_configs"][1]["attention"] == {"no_op": False, "replace_with_linear": False,
                                                    "n_heads_in_group": 2, "window_length": 8}
    assert architecture_from_dict(raw, "config.json", block_types())[1] == blocks
    raw["block_configs"][1]["attention"]["window_length"] = -8
    with pytest.raises(HwoptError, match=r"^config.json: layer 1: attention.window_length = -8 must be a positive"):
        architecture_from_dict(raw, "config.json", block_types())


def test_without_the_plugin_installed_the_config_is_refused(sliding_window, tmp_path):
    raw = nemotron_nas_config(tiny_config(), window_blocks(sliding_window, tiny_config(), 8), block_types())
    (tmp_path / "config.json").write_text(json.dumps(raw))
    proc = hwopt_cli("estimate", "--model", tmp_path / "config.json", "--target", "h100")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"hwopt: error: {tmp_path / 'config.json'}: layer 1: attention.window_length = 8: sliding-window attention "
        "needs the hwopt-sliding-window plugin (pip install ./plugins/hwopt-sliding-window)"]


@torch.no_grad()
def test_window_attention_decodes_with_at_most_w_cached_tokens_as_the_full_forward_does(sliding_window):
    torch.manual_seed(0)
    config = tiny_config()
    model = HeteroLlamaForCausalLM(config, window_blocks(sliding_window, config, 5), block_types()).eval()
    ids = torch.randint(0, config.vocab_size, (2, 14))
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    steps = [out.logits]
    for t in range(6, 14):
        out = model(ids[:, t:t + 1], past_key_values=out.past_key_values)
        steps.append(out.logits)
        assert out.past_key_values.keys[1].shape[2] == 5  # the window layer keeps W tokens
        assert out.past_key_values.keys[0].shape[2] == t + 1  # the parent's layers keep them all
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    # a window as long as the text is the parent's attention
    parent = HeteroLlamaForCausalLM(config, [parent_block_config(config)] * 3, block_types()).eval()
    wide = HeteroLlamaForCausalLM(config, window_blocks(sliding_window, config, 14), block_types()).eval()
    wide.load_state_dict(parent.state_dict())
    torch.testing.assert_close(wide(ids).logits, parent(ids).logits, atol=1e-5, rtol=0)
    narrow = HeteroLlamaForCausalLM(config, window_blocks(sliding_window, config, 3), block_types()).eval()
    narrow.load_state_dict(parent.state_dict())
    assert (narrow(ids).logits - parent(ids).logits).abs().max() > 1e-3


def test_window_variants_are_offered_only_to_a_run_that_names_the_plugin(sliding_window):
    config = tiny_config()
    names = [v.name for v in sub_variants(config, SearchSpace(options=(("window", (64, 8)),)), "attention")]
    assert names == ["kv2", "kv1", "attn_linear", "attn_noop"]  # installed, but left out of this run
    space = SearchSpace(block_type_plugins=("sliding_window",), options=(("window", (64, 8)),))
    names = [v.name for v in sub_variants(config, space, "attention")]
    assert names == ["kv2", "kv1", "attn_linear", "attn_noop", "window64", "window8"]
    with pytest.raises(HwoptError, match="--block-types no_such_plugin: no installed plugin .* sliding_window"):
        sub_variants(config, SearchSpace(block_type_plugins=("no_such_plugin",)), "attention")


def test_window_memory_and_roofline_see_at_most_w_tokens(sliding_window):
    config = tiny_config()
    window = sub_variant_of(config, sliding_window.SlidingWindowConfig(2, 16))
    gqa = sub_variant_of(config, AttentionConfig(n_heads_in_group=2))
    scenario = Scenario(batch=4, input_len=100, output_len=28)
    w, g = (cost_entry(v, config, scenario, {}, {}) for v in (window, gqa))
    per_token = 2 * 2 * 16 * 4 / 2**20  # K and V, 2 KV heads of 16, fp32, in MiB
    assert g["kv_cache_mib"] == pytest.approx(4 * 128 * per_token)
    assert w["kv_cache_mib"] == pytest.approx(4 * 16 * per_token)
    assert w["num_params"] == g["num_params"]
    decode = Phase("decode", 4, 1, 100)
    wt, gt = (v.block_type.cost_terms(v.config, config, decode) for v in (window, gqa))
    assert wt.kv_read == 2 * 4 * 16 * 32 and gt.kv_read == 2 * 4 * 100 * 32
    assert gt.flops - wt.flops == 2 * (2 * 16) * 4 * 4 * (101 - 16)  # 85 fewer keys per query head
    assert attended_pairs(Phase("prefill", 1, 5, 0), window=2) == 1 + 2 * 4
    assert isinstance(wt, CostTerms)


def test_estimate_of_a_llama_8b_child_with_half_its_layers_windowed(sliding_window, tmp_path):
    """16 layers x 28,032 tokens x 4 KiB x 8 sequences = 14,016 MiB of KV cache saved."""
    parent = resolve_model("llama-3.1-8b")
    config = parent.config
    blocks = [BlockConfig(sliding_window.SlidingWindowConfig(4, 4096), b.ffn) if i % 2 else b
              for i, b in enumerate(parent.block_configs)]
    (tmp_path / "config.json").write_text(json.dumps(nemotron_nas_config(config, blocks, block_types())))
    h100 = resolve_target("h100")
    scenario = Scenario.for_target(h100, "128/32000", 8, "bf16")
    child, base = (estimate(resolve_model(str(m)), h100, scenario)["total"] for m in (tmp_path / "config.json",
                                                                                       "llama-3.1-8b"))
    assert base["kv_cache_mib"] - child["kv_cache_mib"] == 16 * (32128 - 4096) * 4 * 8 / 1024 == 14016
    assert child["num_params"] == base["num_params"]
    assert child["decode_ms"] < base["decode_ms"]


@pytest.mark.installs_plugin
def test_installed_plugin_through_the_pipeline_to_a_reloadable_checkpoint(installed_window_plugin, tiny_llama_dir,
                                                                          tmp_path):
    env = env_with_pythonpath(installed_window_plugin)
    workdir = tmp_path / "run"
    space = ["--block-types", "sliding_window", "--window", "8", "--kv-heads", "2", "--no-linear", "--no-noop",
             "--ffn-fractions", "1", "--scenario", "24/16", "--repeats", "2", "--seq-len", "32", "--bld-tokens",
             "512", "--score-tokens", "64", "--uptrain-tokens", "128", "--distill-samples", "64"]
    proc = hwopt_cli("profile", "--model", tiny_llama_dir, "--workdir", workdir, *space, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    costs = json.loads((workdir / "profile/costs.json").read_text())
    attention = costs["attention"]
    assert attention["window8"]["config"]["window_length"] == 8
    saving = attention["kv2"]["memory_mib"] - attention["window8"]["memory_mib"]
    assert saving > 0
    layers = 4
    parent_total = costs["outside_layers"]["memory_mib"] + layers * (attention["kv2"]["memory_mib"]
                                                                    + costs["ffn"]["ffn512"]["memory_mib"])
    proc = hwopt_cli("optimize", "--workdir", workdir, "--memory", f"{parent_total - 0.5 * saving:.6f}MiB", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = json.loads((workdir / "solve/solutions.json").read_text())["solutions"][0]["variants"]
    assert ["window8", "ffn512"] in chosen
    run = json.loads((workdir / "run.json").read_text())
    assert run["block_types"] == ["sliding_window"] and run["block_options"] == {"window": [8]}
    lowered = json.loads((workdir / "lower/nemotron-nas/config.json").read_text())
    windowed = [b["attention"] for b in lowered["block_configs"] if b["attention"].get("window_length")]
    assert windowed and all(a["window_length"] == 8 and a["n_heads_in_group"] == 2 for a in windowed)
    code = ("import sys, torch, hwopt; ids = torch.arange(40).reshape(2, 20) % 1000; "
            "a, b = (hwopt.load_model(p)(ids).logits for p in sys.argv[1:]); print(torch.equal(a, b))")
    proc = subprocess.run([sys.executable, "-c", code, str(workdir / "uptrain/model"),
                           str(workdir / "lower/nemotron-nas")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
    proc = hwopt_cli("estimate", "--model", workdir / "lower/nemotron-nas", "--parent", tiny_llama_dir, "--target",
                     "h100", "--scenario", "24/16", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MiB smaller" in proc.stdout and "window8" in proc.stdout
