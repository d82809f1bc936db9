"""nemotron-nas (DeciLM) block-config semantics and the config.json a child is written with."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from hwopt.errors import HwoptError
from hwopt.model.architecture import architecture_from_dict
from hwopt.model.checkpoint import nemotron_nas_config
from hwopt.model.config import (
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
    parent_block_config,
)
from hwopt.plugins import block_types

HIDDEN = 64


def tiny_config(**kw) -> LlamaConfig:
    args = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=128)
    return LlamaConfig(**{**args, **kw})


def test_ffn_mult_rule_matches_llama_3_1():
    assert ffn_mult_to_intermediate_size(5.25, 8192) == 28672  # Llama-3.1-70B
    assert ffn_mult_to_intermediate_size(2.625, 8192) == 14336  # half of 70B's width
    assert ffn_mult_to_intermediate_size(5.25, 4096) == 14336  # Llama-3.1-8B
    assert ffn_mult_to_intermediate_size(1.0, 4096) == 2816  # 2730 rounded up to the 256 grid
    for size in (28672, 14336, 7168):
        assert ffn_mult_to_intermediate_size(intermediate_size_to_ffn_mult(size, 8192), 8192) == size


BLOCKS = [
    BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=128)),  # the parent's
    BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=64)),  # sized variants
    BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(replace_with_linear=True)),
    BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True)),
]


@pytest.mark.parametrize("block", BLOCKS, ids=["parent", "sized", "linear", "no_op"])
def test_block_config_json_round_trip(block):
    d = block.to_json(block_types(), tiny_config())
    assert set(d) == {"attention", "ffn"}
    assert set(d["attention"]) == {"no_op", "replace_with_linear", "n_heads_in_group"}
    assert set(d["ffn"]) == {"no_op", "replace_with_linear", "ffn_mult", "intermediate_size"}
    assert BlockConfig.from_json(json.loads(json.dumps(d)), tiny_config(), block_types()) == block
    if block.ffn.intermediate_size is None:
        assert d["ffn"]["ffn_mult"] is None and d["ffn"]["intermediate_size"] is None
    else:
        assert d["ffn"]["ffn_mult"] == pytest.approx(block.ffn.intermediate_size * 3 / (2 * HIDDEN))
    if block.attention.no_op or block.attention.replace_with_linear:
        assert d["attention"]["n_heads_in_group"] is None


def test_ffn_from_json_with_only_ffn_mult_derives_the_size():
    cfg = FFNConfig.from_json({"no_op": False, "replace_with_linear": False, "ffn_mult": 5.25}, 8192)
    assert cfg.intermediate_size == 28672
    cfg = FFNConfig.from_json({"ffn_mult": 2.625, "intermediate_size": None}, 8192)
    assert cfg.intermediate_size == 14336


def test_no_op_and_linear_together_is_an_error():
    both = {"no_op": True, "replace_with_linear": True}
    with pytest.raises(HwoptError, match="attention.no_op and attention.replace_with_linear are both true"):
        AttentionConfig.from_json(both, 4)
    with pytest.raises(HwoptError, match="ffn.no_op and ffn.replace_with_linear are both true"):
        FFNConfig.from_json(both, HIDDEN)
    with pytest.raises(HwoptError, match="layer 3: ffn.no_op and ffn.replace_with_linear are both true"):
        BlockConfig.from_json({"attention": {"n_heads_in_group": 1}, "ffn": both}, tiny_config(), block_types(),
                              "layer 3")


def test_sized_sub_blocks_need_a_size():
    with pytest.raises(HwoptError, match="attention.n_heads_in_group is missing"):
        AttentionConfig.from_json({"no_op": False}, 4)
    with pytest.raises(HwoptError, match=r"ffn.ffn_mult is missing \(or intermediate_size\)"):
        FFNConfig.from_json({"no_op": False}, HIDDEN)
    with pytest.raises(HwoptError, match="ffn is missing"):
        BlockConfig.from_json({"attention": {"n_heads_in_group": 1}}, tiny_config(), block_types())


def test_nemotron_nas_config_fields():
    config = tiny_config()
    out = nemotron_nas_config(config, BLOCKS, block_types())
    out = json.loads(json.dumps(out))  # what config.json holds
    assert out["model_type"] == "nemotron-nas"
    assert out["architectures"] == ["DeciLMForCausalLM"]
    assert "intermediate_size" in out and out["intermediate_size"] is None
    assert "num_key_value_heads" in out and out["num_key_value_heads"] is None
    assert out["rope_theta"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert out["num_hidden_layers"] == len(out["block_configs"]) == 4
    assert out["block_configs"] == [b.to_json(block_types(), config) for b in BLOCKS]


def test_architecture_from_dict_reads_it_back():
    config = tiny_config()
    raw = json.loads(json.dumps(nemotron_nas_config(config, BLOCKS, block_types())))
    back, blocks = architecture_from_dict(raw, "config.json", block_types())
    assert blocks == BLOCKS
    assert back.hidden_size == HIDDEN and back.num_hidden_layers == 4 and back.vocab_size == 101
    # the nulled Llama fields come back as the largest per-layer value
    assert back.intermediate_size == 128
    assert back.num_key_value_heads == 2
    assert back.rope_theta == pytest.approx(config.rope_parameters["rope_theta"])
    assert back.transformers().to_dict() == {**config.to_dict(), "intermediate_size": 128, "num_key_value_heads": 2,
                                             "dtype": "float32"}  # as the child file says


def test_llama_dict_gives_the_parent_block_everywhere():
    config = tiny_config()
    raw = {**config.to_dict(), "model_type": "llama"}
    back, blocks = architecture_from_dict(raw, "config.json", block_types())
    assert blocks == [parent_block_config(config)] * 4


def test_wrong_block_config_count_is_an_error():
    raw = nemotron_nas_config(tiny_config(), BLOCKS, block_types())
    raw["block_configs"] = raw["block_configs"][:3]
    with pytest.raises(HwoptError, match="3 block_configs for 4 layers"):
        architecture_from_dict(raw, "somewhere/config.json", block_types())


def test_unknown_model_type_is_an_error():
    raw = {**tiny_config().to_dict(), "model_type": "mistral"}
    with pytest.raises(HwoptError, match="'mistral'"):
        architecture_from_dict(raw, "config.json", block_types())
