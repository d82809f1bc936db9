"""The heterogeneous Llama: every layer picks its own attention and FFN.

This is the `nemotron-nas` (DeciLM) architecture. Per layer, attention is
grouped-query attention with any number of KV heads that divides the query
heads, one linear layer, or nothing; the FFN is SwiGLU of any width, one
linear layer, or nothing. A sub-block that is nothing has no norm either.
With every block equal to the parent's, the model computes exactly what
transformers' ``LlamaForCausalLM`` computes (RMSNorm and rotary embeddings
are transformers' own).

Module names follow the checkpoint's weight names
(``model.layers.{i}.self_attn.linear_attn.weight`` and so on), so a state
dict is a checkpoint.

The sub-blocks are built by their block types (``hwopt.protocols.BlockType``),
which the caller hands in (``hwopt.plugins.block_types()``): this module
knows no registry. Every sub-block is called the same way,
``module(norm(x), position_embeddings, cache, layer_idx)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from hwopt.model.config import BlockConfig, head_dim


class KVCache:
    """Keys and values per layer, grown by concatenation as decoding goes on."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens already cached (advanced by the model after each forward)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


class GroupedQueryAttention(nn.Module):
    """Causal self-attention where each KV head serves `n_heads_in_group` query heads."""

    def __init__(self, config, n_heads_in_group: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = head_dim(config)
        self.num_kv_heads = self.num_heads // n_heads_in_group
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def project(self, x, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q ``[batch, heads, tokens, head_dim]``, K and V ``[batch, kv_heads, tokens, head_dim]``, rotated."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def forward(self, x, position_embeddings, cache: KVCache | None = None, layer_idx: int = 0):
        batch, seq, _ = x.shape
        q, k, v = self.project(x, position_embeddings)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        if past == 0 or seq == 1:  # a prompt is causal; one new token sees everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and seq > 1, enable_gqa=True)
        else:  # several new tokens see the whole cache and the causal part of themselves
            mask = torch.ones(seq, past + seq, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class LinearReplacement(nn.Module):
    """A sub-block replaced by one hidden x hidden linear map (no mixing across tokens).

    The weight keeps the name checkpoints give it (``linear_attn`` or ``linear_mlp``).
    """

    weight_name: str

    def __init__(self, config):
        super().__init__()
        setattr(self, self.weight_name, nn.Linear(config.hidden_size, config.hidden_size, bias=False))

    @property
    def linear(self) -> nn.Linear:
        return getattr(self, self.weight_name)

    def forward(self, x, position_embeddings=None, cache=None, layer_idx=0):
        return self.linear(x)


class LinearAttention(LinearReplacement):
    weight_name = "linear_attn"


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the Llama FFN, at any intermediate size."""

    def __init__(self, config, intermediate_size: int):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x, position_embeddings=None, cache=None, layer_idx=0):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearFFN(LinearReplacement):
    weight_name = "linear_mlp"


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); a missing sub-block is skipped with its norm."""

    def __init__(self, config, block: BlockConfig, block_types):
        super().__init__()
        self.block = block
        self.self_attn = block_types.of(block.attention).build(block.attention, config)
        self.mlp = block_types.of(block.ffn).build(block.ffn, config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps) if self.self_attn else None
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps) if self.mlp else None

    @classmethod
    def from_parts(cls, block: BlockConfig, self_attn, input_layernorm, mlp, post_attention_layernorm):
        """A layer made of existing modules (library variants, or the parent's own)."""
        layer = nn.Module.__new__(cls)
        nn.Module.__init__(layer)
        layer.block = block
        layer.self_attn, layer.input_layernorm = self_attn, input_layernorm
        layer.mlp, layer.post_attention_layernorm = mlp, post_attention_layernorm
        return layer

    def attention_delta(self, x, position_embeddings, cache=None, layer_idx=0):
        return self.self_attn(self.input_layernorm(x), position_embeddings, cache, layer_idx)

    def ffn_delta(self, x, position_embeddings=None, cache=None, layer_idx=0):
        return self.mlp(self.post_attention_layernorm(x), position_embeddings, cache, layer_idx)

    def forward(self, x, position_embeddings, cache=None, layer_idx=0):
        if self.self_attn is not None:
            x = x + self.attention_delta(x, position_embeddings, cache, layer_idx)
        if self.mlp is not None:
            x = x + self.ffn_delta(x, position_embeddings, cache, layer_idx)
        return x


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then the output of every layer


class Model(nn.Module):
    """Embeddings, the layers and the final norm (``model.*`` in checkpoints)."""

    def __init__(self, config, block_configs: list[BlockConfig], block_types):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, block, block_types) for block in block_configs)
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)


class HeteroLlamaForCausalLM(nn.Module):
    """A causal LM whose layers each have their own ``BlockConfig``.

    ``block_types`` (``hwopt.plugins.BlockTypes``) builds each sub-block, and
    is kept to write the ``block_configs`` back (``block_configs_json``).
    """

    def __init__(self, config, block_configs: list[BlockConfig], block_types):
        super().__init__()
        if len(block_configs) != config.num_hidden_layers:
            raise ValueError(f"{len(block_configs)} block configs for {config.num_hidden_layers} layers")
        self.config = config
        self.block_configs = list(block_configs)
        self.block_types = block_types
        self.model = Model(config, self.block_configs, block_types)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def position_embeddings(self, x: torch.Tensor, start: int):
        positions = torch.arange(start, start + x.shape[1], device=x.device).unsqueeze(0)
        return self.model.rotary_emb(x, positions)

    def run_layers(self, x, position_embeddings, start: int = 0, cache=None, hidden_states=None):
        """Layers ``start`` onwards; appends each layer's output to ``hidden_states`` if given."""
        for i in range(start, len(self.model.layers)):
            x = self.model.layers[i](x, position_embeddings, cache, i)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def head(self, x):
        return self.lm_head(self.model.norm(x))

    def forward(self, input_ids, past_key_values: KVCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, logits_to_keep: int = 0) -> CausalLMOutput:
        """Logits for every position, or for the last ``logits_to_keep`` (generation needs one)."""
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(len(self.model.layers))
        x = self.model.embed_tokens(input_ids)
        position_embeddings = self.position_embeddings(x, cache.length if cache is not None else 0)
        hidden_states = [x] if output_hidden_states else None
        x = self.run_layers(x, position_embeddings, cache=cache, hidden_states=hidden_states)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return CausalLMOutput(self.head(x), cache, tuple(hidden_states) if hidden_states else None)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once


@torch.inference_mode()
def generate(model: HeteroLlamaForCausalLM, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the KV cache: one prefill, then one step per further token."""
    out = model(prompts, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(tokens[-1], past_key_values=out.past_key_values, logits_to_keep=1)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)
