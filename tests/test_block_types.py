"""The built-in block types: parameter counts, and initialisation from the parent block."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hwopt.builtin.block_types import ffn_width, least_squares_linear
from hwopt.model.config import AttentionConfig, FFNConfig
from hwopt.model.modeling_nemotron_nas import GroupedQueryAttention, LinearFFN, SwiGLU
from hwopt.search_space import SearchSpace, sub_variant_of, sub_variants


def tiny_config(**kw) -> LlamaConfig:
    args = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                num_hidden_layers=2, vocab_size=101, max_position_embeddings=128)
    return LlamaConfig(**{**args, **kw})


def rotary(config, x):
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    return LlamaRotaryEmbedding(config)(x, positions)


def all_variants(config):
    return [v for kind in ("attention", "ffn") for v in sub_variants(config, SearchSpace(), kind)]


def test_default_space_offers_every_kind_of_variant():
    names = {v.name for v in all_variants(tiny_config(intermediate_size=1024))}
    assert names == {"kv2", "kv1", "attn_linear", "attn_noop", "ffn1024", "ffn768", "ffn512", "ffn256",
                     "ffn_linear", "ffn_noop"}
    space = SearchSpace(linear=False, no_op=False, ffn_fractions=(0.5,))
    assert [v.name for v in sub_variants(tiny_config(intermediate_size=1024), space, "ffn")] == ["ffn1024", "ffn512"]
    # a parent too narrow for the ffn_mult grid (widths are multiples of 256) keeps only its own width
    assert [v.name for v in sub_variants(tiny_config(), space, "ffn")] == ["ffn128"]


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_num_params_matches_the_built_module(bias):
    config = tiny_config(attention_bias=bias, mlp_bias=bias, intermediate_size=1024)
    variants = all_variants(config)
    assert len(variants) == 10
    for v in variants:
        module = v.block_type.build(v.config, config)
        expected = v.block_type.num_params(v.config, config)
        if module is None:  # no-op: nothing, not even a norm
            assert expected == 0, v.name
        else:
            built = sum(p.numel() for p in module.parameters()) + config.hidden_size  # + the RMSNorm weight
            assert expected == built, v.name
        assert sub_variant_of(config, v.config).block_type is v.block_type


@torch.no_grad()
def test_gqa_with_the_parents_kv_heads_reproduces_the_parent():
    torch.manual_seed(0)
    config = tiny_config()
    parent = GroupedQueryAttention(config, n_heads_in_group=2)
    x = torch.randn(2, 9, 64)
    pos = rotary(config, x)
    v = sub_variant_of(config, AttentionConfig(n_heads_in_group=2))
    child = v.block_type.build(v.config, config)
    v.block_type.init_from_parent(child, parent, x, pos)
    torch.testing.assert_close(child(x, pos), parent(x, pos), atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_merged_kv_head_reproduces_a_parent_whose_kv_heads_are_equal(bias):
    torch.manual_seed(0)
    config = tiny_config(attention_bias=bias)
    parent = GroupedQueryAttention(config, n_heads_in_group=2)  # 2 KV heads of 16 dims
    for proj in (parent.k_proj, parent.v_proj):
        proj.weight[16:] = proj.weight[:16]
        if bias:
            proj.bias[16:] = proj.bias[:16]
    x = torch.randn(2, 9, 64)
    pos = rotary(config, x)
    v = sub_variant_of(config, AttentionConfig(n_heads_in_group=4))
    assert v.name == "kv1"
    child = v.block_type.build(v.config, config)
    assert child.num_kv_heads == 1
    v.block_type.init_from_parent(child, parent, x, pos)
    torch.testing.assert_close(child(x, pos), parent(x, pos), atol=1e-5, rtol=0)
    # with different heads the merge is an approximation, not the parent
    parent.k_proj.weight[16:] = torch.randn(16, 64)
    v.block_type.init_from_parent(child, parent, x, pos)
    assert (child(x, pos) - parent(x, pos)).abs().max() > 1e-3


@torch.no_grad()
def test_ffn_pruning_keeps_the_channels_that_matter():
    torch.manual_seed(0)
    config = tiny_config()
    parent = SwiGLU(config, 128)
    dead = torch.randperm(128)[:80]  # 80 channels contribute nothing: their down_proj columns are zero
    parent.down_proj.weight[:, dead] = 0
    x = torch.randn(4, 7, 64)
    v = sub_variant_of(config, FFNConfig(intermediate_size=48))
    child = v.block_type.build(v.config, config)
    v.block_type.init_from_parent(child, parent, x, None)
    torch.testing.assert_close(child(x), parent(x), atol=1e-5, rtol=0)
    # and it kept exactly the live channels, in their original order
    live = sorted(set(range(128)) - set(dead.tolist()))
    torch.testing.assert_close(child.gate_proj.weight, parent.gate_proj.weight[live])


def test_least_squares_recovers_a_linear_map():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = torch.randn(2000, 64)
    fitted = least_squares_linear(x, x @ w.T)
    assert fitted.shape == w.shape
    torch.testing.assert_close(fitted, w, atol=1e-3, rtol=0)


@torch.no_grad()
def test_linear_ffn_from_a_linear_parent_is_the_parent():
    torch.manual_seed(0)
    config = tiny_config()
    parent = LinearFFN(config)
    x = torch.randn(4, 500, 64)
    v = sub_variant_of(config, FFNConfig(replace_with_linear=True))
    child = v.block_type.build(v.config, config)
    v.block_type.init_from_parent(child, parent, x, None)
    torch.testing.assert_close(child.linear_mlp.weight, parent.linear_mlp.weight, atol=1e-3, rtol=0)


def test_ffn_width():
    assert ffn_width(1536, 0.5) == 768
    assert ffn_width(1024, 0.75) == 768 and ffn_width(1024, 0.1) is None  # no width below 256 is on the grid
    assert ffn_width(256, 0.5) is None and ffn_width(128, 0.75) is None  # nothing on the grid below the parent
    for parent in (14336, 28672, 1536, 8192):
        for fraction in (0.75, 0.5, 0.25, 0.3, 0.2):
            width = ffn_width(parent, fraction)
            assert width % 256 == 0 and width >= 256, (parent, fraction, width)
            assert abs(width - parent * fraction) <= 128
    assert ffn_width(14336, 0.75) == 10752 and ffn_width(28672, 0.5) == 14336
