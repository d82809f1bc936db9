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
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from hwopt.errors import HwoptError
from hwopt.model.config import BlockConfig
from hwopt.model.modeling_nemotron_nas import DecoderLayerBase, attention_mask_4d


class KVCache:
    """Keys and values per layer, grown by concatenation as decoding goes on."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens already cached (advanced by the model after each forward)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` [batch, kv_heads, new, head_dim] to layer ``layer_idx``; return all of them."""
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


class PreallocatedKVCache(KVCache):
    """A ``KVCache`` that writes each step into buffers of ``capacity`` tokens, allocated at a layer's first
    update, instead of concatenating (which copies the whole cache every step: 30% of the time of sampling 128
    sequences of 128 tokens from SmolLM2 on 2 CPU cores).

    Raises:
        HwoptError: on an update past ``capacity`` tokens.
    """

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(num_layers)
        self.capacity = capacity

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise HwoptError(f"the KV cache holds {self.capacity} tokens, not {end}")
        if self.keys[layer_idx] is None:
            batch, kv_heads, _, head_dim = k.shape
            self.keys[layer_idx] = k.new_empty(batch, kv_heads, self.capacity, head_dim)
            self.values[layer_idx] = v.new_empty(batch, kv_heads, self.capacity, head_dim)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]  # [b, kv, past + new, d], views of the buffers


class DecoderLayer(DecoderLayerBase):
    """A layer whose sub-blocks its block types build (see ``DecoderLayerBase`` for its forward)."""

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


def rotary_tables(rotary_emb: nn.Module, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary (cos, sin) tables [1, seq, head_dim] for positions ``start`` onwards of ``x`` [batch, seq,
    hidden], in ``x``'s dtype."""
    positions = torch.arange(start, start + x.shape[1], device=x.device).unsqueeze(0)
    return rotary_emb(x, positions)


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

    # the pieces a pass reads one at a time; ``hwopt.model.layerwise.LayerwiseParent`` reads the same from disk
    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def decoder_layer(self, i: int) -> DecoderLayer:
        return self.model.layers[i]

    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def output_head(self) -> tuple[nn.Module, nn.Linear]:
        """The final norm and the LM head."""
        return self.model.norm, self.lm_head

    def position_embeddings(self, x: torch.Tensor, start: int):
        return rotary_tables(self.model.rotary_emb, x, start)

    def run_layers(self, x, position_embeddings, start: int = 0, cache=None, hidden_states=None, attention_mask=None):
        """Layers ``start`` onwards; appends each layer's output to ``hidden_states`` if given."""
        for i in range(start, len(self.model.layers)):
            x = self.model.layers[i](x, position_embeddings, cache, i, attention_mask)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def head(self, x):
        return self.lm_head(self.model.norm(x))

    def forward(self, input_ids, past_key_values: KVCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, logits_to_keep: int = 0, attention_mask=None,
                position_ids=None) -> CausalLMOutput:
        """``input_ids`` [batch, new] → logits [batch, new (or the last ``logits_to_keep``), vocab].

        ``past_key_values`` (a ``KVCache``, or anything with transformers'
        ``update(k, v, layer_idx)``) holds the earlier tokens; ``use_cache``
        starts one. ``attention_mask`` [batch, past + new] (1 real, 0
        padding) and ``position_ids`` [batch, new] are optional: without them
        every token is real and positions follow the cache.
        """
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(len(self.model.layers))
        x = self.model.embed_tokens(input_ids)  # [batch, new, hidden]
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + input_ids.shape[1], device=x.device).unsqueeze(0)
        position_embeddings = self.model.rotary_emb(x, position_ids)
        mask = attention_mask_4d(attention_mask, input_ids.shape[1]) if attention_mask is not None else None
        hidden_states = [x] if output_hidden_states else None
        x = self.run_layers(x, position_embeddings, cache=cache, hidden_states=hidden_states, attention_mask=mask)
        if isinstance(cache, KVCache):
            cache.length += input_ids.shape[1]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return CausalLMOutput(self.head(x), cache, tuple(hidden_states) if hidden_states else None)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def to_transformers(self):
        """This model as the transformers ``DeciLMForCausalLM`` that checkpoints ship, sharing its weights.

        Raises HwoptError for a block a plugin added, which that code cannot build.
        """
        from hwopt.model.architecture import nemotron_nas_config
        from hwopt.model.modeling_nemotron_nas import DeciLMForCausalLM, NemotronNASConfig

        config = NemotronNASConfig(**nemotron_nas_config(self.config, self.block_configs, self.block_types))
        with torch.device("meta"):
            hf = DeciLMForCausalLM(config)
        try:
            hf.load_state_dict(self.state_dict(), strict=True, assign=True)
        except RuntimeError as exc:
            raise HwoptError(f"this model has blocks the nemotron-nas modeling code cannot build: "
                             f"{str(exc).splitlines()[1].strip()}") from None
        hf.model.rotary_emb = self.model.rotary_emb  # its tables are buffers, which a state dict does not carry
        return hf.eval()

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """transformers' ``generate()`` on this model, with its KV cache: greedy by default.

        ``input_ids`` [batch, prompt] (with ``attention_mask`` for padded
        prompts) → [batch, prompt + new] token ids. Takes every option of
        transformers' ``GenerationMixin.generate``: ``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``eos_token_id``, a ``streamer`` and so on.
        """
        with torch.inference_mode():
            return self.to_transformers().generate(input_ids, **kwargs)


@torch.inference_mode()
def greedy_tokens(model: HeteroLlamaForCausalLM, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The bare greedy loop that hwopt times: one prefill, then one step per further token; [batch, new_tokens].

    No stopping at end of sequence and no sampling: every model generates the
    same number of tokens, so their times compare. Users want ``model.generate``.
    """
    out = model(prompts, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(tokens[-1], past_key_values=out.past_key_values, logits_to_keep=1)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)
