"""The nemotron-nas (DeciLM) architecture for transformers 5, in one self-contained file.

hwopt copies this file into every checkpoint it lowers, with an ``auto_map``
in ``config.json``, so that anyone with transformers loads the child::

    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    model.generate(input_ids, max_new_tokens=32)

It imports only torch and transformers, never hwopt. hwopt's own model
(``hwopt.model.modeling``) is built from the same sub-blocks, so the two
compute the same numbers.

Per layer (``config.block_configs[i]``), attention is grouped-query attention
whose KV heads are ``num_attention_heads // n_heads_in_group``, one hidden x
hidden linear map (``replace_with_linear``), or nothing (``no_op``); the FFN
is SwiGLU of width ``intermediate_size`` (else derived from ``ffn_mult``), one
linear map, or nothing. A sub-block that is nothing has no norm either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

# transformers 5.x renamed the output's and forward's ``past_key_values`` to ``cache`` partway through.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The DeciLM rule: int(2 * ffn_mult * hidden / 3), rounded up to a multiple of 256."""
    return 256 * math.ceil(int(2 * ffn_mult * hidden_size / 3) / 256)


class NemotronNASConfig(PretrainedConfig):
    """A Llama config whose layers each carry their own ``block_configs`` entry.

    The top-level ``num_key_value_heads`` and ``intermediate_size`` are null in
    a nemotron-nas config.json: every layer says its own.
    """

    model_type = "nemotron-nas"

    def __init__(self, vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 head_dim=None, block_configs=None, rms_norm_eps=1e-6, max_position_embeddings=2048,
                 attention_bias=False, mlp_bias=False, tie_word_embeddings=False, num_key_value_heads=None,
                 intermediate_size=None, use_cache=True, rope_parameters=None, rope_theta=10000.0, rope_scaling=None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.block_configs = block_configs or []
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.use_cache = use_cache
        # transformers 5 reads rope_parameters; older configs (and vLLM, TensorRT-LLM) read rope_theta / rope_scaling
        scaling = rope_scaling or {}
        self.rope_parameters = rope_parameters or {**scaling, "rope_theta": rope_theta,
                                                   "rope_type": scaling.get("rope_type", "default")}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def has_kv_cache(block_config: dict) -> bool:
    attention = block_config["attention"]
    return not (attention.get("no_op") or attention.get("replace_with_linear"))


def attention_mask_4d(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Which cached or new key each new query may attend to: ``[batch, 1, new, past + new]`` booleans.

    ``attention_mask`` is the usual ``[batch, past + new]`` (1 for a real token,
    0 for padding). A query sees earlier real tokens and always itself, so no
    row is empty (a padding query would otherwise turn into NaN).
    """
    total = attention_mask.shape[1]
    query = torch.arange(total - new_tokens, total, device=attention_mask.device)[:, None]  # [new, 1]
    key = torch.arange(total, device=attention_mask.device)[None, :]  # [1, past + new]
    causal = key <= query  # [new, past + new]
    allowed = (causal[None] & attention_mask[:, None, :].bool()) | (key == query)[None]  # [batch, new, past + new]
    return allowed[:, None]  # one mask for every head


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token: ``q`` [batch, heads, 1, head_dim] over all of ``k``, ``v`` [batch, kv_heads,
    past, head_dim] → [batch, heads, 1, head_dim], as ``scaled_dot_product_attention(..., enable_gqa=True)``.

    Two batched matmuls, each KV head against its group of query heads. On the CPU in bf16, SDPA's flash kernel
    takes about 13x as long for one query (9.8 against 0.75 ms at batch 128, 9 heads, 110 keys, 2 cores).
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.view(batch, kv_heads, heads // kv_heads, head_dim)  # query head h uses KV head h // group
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5  # [b, kv, group, past]
    y = scores.float().softmax(-1).to(v.dtype) @ v  # [b, kv, group, head_dim]
    return y.view(batch, heads, 1, head_dim)


class GroupedQueryAttention(nn.Module):
    """Causal self-attention where each KV head serves ``n_heads_in_group`` query heads."""

    def __init__(self, config, n_heads_in_group: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = self.num_heads // n_heads_in_group
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def project(self, x, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q ``[batch, heads, new, head_dim]``, K and V ``[batch, kv_heads, new, head_dim]``, rotated."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [b, heads, new, d]
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kv, new, d]
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def forward(self, x, position_embeddings, cache=None, layer_idx: int = 0, attention_mask=None):
        """``x`` [batch, new, hidden] → [batch, new, hidden].

        ``cache.update(k, v, layer_idx)`` (transformers' ``Cache`` protocol)
        appends this step's keys and values and returns all of them.
        ``attention_mask`` is ``attention_mask_4d``'s; without it every token
        is real and attention is causal.
        """
        batch, seq, _ = x.shape
        q, k, v = self.project(x, position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)  # [b, kv, past + new, d]
        past = k.shape[2] - seq
        if attention_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, enable_gqa=True)
        elif seq == 1 and past and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            y = grouped_decode_attention(q, k, v)
        elif past == 0 or seq == 1:  # a prompt is causal; one new token sees everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and seq > 1, enable_gqa=True)
        else:  # several new tokens see the whole cache and the causal part of themselves
            mask = torch.ones(seq, past + seq, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))  # [b, new, heads * d] → [b, new, hidden]


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

    def forward(self, x, position_embeddings=None, cache=None, layer_idx=0, attention_mask=None):
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

    def forward(self, x, position_embeddings=None, cache=None, layer_idx=0, attention_mask=None):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearFFN(LinearReplacement):
    weight_name = "linear_mlp"


class DecoderLayerBase(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); a missing sub-block (None) is skipped with its norm.

    Subclasses build ``self_attn``, ``input_layernorm``, ``mlp`` and
    ``post_attention_layernorm``. Every sub-block is called the same way:
    ``module(norm(x), position_embeddings, cache, layer_idx, attention_mask)``.
    """

    def attention_delta(self, x, position_embeddings, cache=None, layer_idx=0, attention_mask=None):
        return self.self_attn(self.input_layernorm(x), position_embeddings, cache, layer_idx, attention_mask)

    def ffn_delta(self, x, position_embeddings=None, cache=None, layer_idx=0, attention_mask=None):
        return self.mlp(self.post_attention_layernorm(x), position_embeddings, cache, layer_idx, attention_mask)

    def forward(self, x, position_embeddings, cache=None, layer_idx=0, attention_mask=None):
        if self.self_attn is not None:
            x = x + self.attention_delta(x, position_embeddings, cache, layer_idx, attention_mask)
        if self.mlp is not None:
            x = x + self.ffn_delta(x, position_embeddings, cache, layer_idx, attention_mask)
        return x


class DeciLMDecoderLayer(DecoderLayerBase):
    """One layer built from its ``block_configs`` JSON entry."""

    def __init__(self, config: NemotronNASConfig, block_config: dict):
        super().__init__()
        attention, ffn = block_config["attention"], block_config["ffn"]
        if attention.get("no_op"):
            self.self_attn = None
        elif attention.get("replace_with_linear"):
            self.self_attn = LinearAttention(config)
        else:
            self.self_attn = GroupedQueryAttention(config, attention["n_heads_in_group"])
        if ffn.get("no_op"):
            self.mlp = None
        elif ffn.get("replace_with_linear"):
            self.mlp = LinearFFN(config)
        else:
            width = ffn.get("intermediate_size") or ffn_mult_to_intermediate_size(ffn["ffn_mult"], config.hidden_size)
            self.mlp = SwiGLU(config, width)
        norm = lambda: LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)  # noqa: E731
        self.input_layernorm = norm() if self.self_attn is not None else None
        self.post_attention_layernorm = norm() if self.mlp is not None else None


class DeciLMPreTrainedModel(PreTrainedModel):
    """transformers' loading and weight initialisation (its ``_init_weights`` also fills the rotary tables)."""

    config_class = NemotronNASConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_sdpa = True


class DeciLMModel(DeciLMPreTrainedModel):
    """Embeddings, the layers and the final norm (``model.*`` in checkpoints)."""

    def __init__(self, config: NemotronNASConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeciLMDecoderLayer(config, block) for block in config.block_configs)
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.post_init()


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    """The causal LM; ``generate()`` is transformers' own, with a ``DynamicCache``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NemotronNASConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """``input_ids`` [batch, new] → logits [batch, new or logits_to_keep, vocab].

        ``attention_mask`` [batch, past + new] (1 real, 0 padding);
        ``position_ids`` [batch, new] (default: past + 0, 1, ...); ``cache``
        (or ``past_key_values``) a transformers ``Cache``, created when
        ``use_cache`` is set.
        """
        cache = cache if cache is not None else past_key_values
        if cache is None and (use_cache if use_cache is not None else self.config.use_cache):
            cache = DynamicCache(config=self.config)
        x = self.model.embed_tokens(input_ids)  # [batch, new, hidden]
        seq = input_ids.shape[1]
        if position_ids is None:
            kv_layers = [i for i, b in enumerate(self.config.block_configs) if has_kv_cache(b)]
            past = cache.get_seq_length(kv_layers[0]) if cache is not None and kv_layers else 0
            position_ids = torch.arange(past, past + seq, device=x.device)[None]
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask_4d(attention_mask, seq)
        position_embeddings = self.model.rotary_emb(x, position_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, position_embeddings, cache, i, mask)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.model.norm(x))
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})
