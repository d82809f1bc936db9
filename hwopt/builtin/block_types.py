"""Built-in block types: GQA, linear and no-op attention; SwiGLU, linear and no-op FFN.

Each type says which variants it offers for a parent layer, builds the
module, and initialises it from the parent block before blockwise
distillation: KV heads are merged by averaging the heads of a group, FFN
channels are kept by activation-based importance, and linear layers are
the least-squares fit of the parent sub-block on its own inputs. Each type
reads and writes its ``block_configs`` entry in nemotron-nas spelling
(``hwopt.model.config``'s ``AttentionConfig``/``FFNConfig``); which type an
entry belongs to is decided by its flags (``claims``).

torch and the modules are imported where a sub-block is built or
initialised: listing block types, reading a config and pricing it with the
roofline (``hwopt plugins``, ``hwopt estimate``) need none of it.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from hwopt.hookspecs import hookimpl
from hwopt.model.config import FFN_MULT_GRID, AttentionConfig, FFNConfig, head_dim
from hwopt.protocols import NO_CACHE, KVCacheShape
from hwopt.roofline import SILU_PRODUCT_FLOPS, CostTerms, attended_pairs, matmul, norm_and_residual
from hwopt.search_space import SearchSpace

if TYPE_CHECKING:
    import torch


def no_grad(method):
    """``torch.no_grad()`` around ``method``, importing torch at the first call rather than with this module."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)
    return wrapper


def least_squares_linear(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The weight W (out x in) minimising ||x W^T - y||^2, lightly ridge-regularised."""
    import torch

    x64, y64 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    gram = x64.T @ x64
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge, x64.T @ y64).T.float()


def ffn_width(parent_size: int, fraction: float) -> int | None:
    """A fraction of the parent's width, rounded half up to the grid of the nemotron-nas ``ffn_mult`` rule.

    Readers that rebuild the width from ``ffn_mult`` (vLLM, TensorRT-LLM,
    llama.cpp, mlx-lm) round it up to a multiple of 256, so only widths on
    that grid come back exactly. None when no width on the grid lies below
    the parent's (a parent narrower than two steps of it).
    """
    width = FFN_MULT_GRID * math.floor(parent_size * fraction / FFN_MULT_GRID + 0.5)
    return width if 0 < width < parent_size else None


def is_set(entry: dict, key: str) -> bool:
    """Whether a ``block_configs`` entry sets a key (to anything but its neutral null or false)."""
    return isinstance(entry, dict) and entry.get(key) not in (None, False)


ATTENTION_KEYS = frozenset({"no_op", "replace_with_linear", "n_heads_in_group", "num_key_value_heads"})
FFN_KEYS = frozenset({"no_op", "replace_with_linear", "ffn_mult", "intermediate_size", "gated", "hidden_act"})


class BuiltinJSON:
    """The nemotron-nas entry of the built-in configs: ``AttentionConfig``/``FFNConfig`` read and write it."""

    @property
    def keys(self) -> frozenset[str]:
        return FFN_KEYS if self.kind == "ffn" else ATTENTION_KEYS

    def to_json(self, cfg, config) -> dict:
        return cfg.to_json(config.hidden_size) if self.kind == "ffn" else cfg.to_json()

    def from_json(self, entry: dict, config, where: str):
        if self.kind == "ffn":
            return FFNConfig.from_json(entry, config.hidden_size, where)
        return AttentionConfig.from_json(entry, config.num_attention_heads, where)


def grouped_query_terms(config, n_heads_in_group: int, phase, window: int | None = None) -> CostTerms:
    """Q, K, V and O projections (K and V into the cache), then QKᵀ and AV over the attended pairs.

    With a ``window``, each token attends to (and the cache holds) at most the last ``window`` tokens.
    """
    hidden, width, heads = config.hidden_size, head_dim(config), config.num_attention_heads
    q, kv = heads * width, heads // n_heads_in_group * width
    tokens, cached = phase.tokens, phase.cached if window is None else min(phase.cached, window)
    core = CostTerms(flops=2 * (2 * width) * heads * attended_pairs(phase, window),  # QKᵀ and AV
                     kv_read=2 * phase.batch * cached * kv, activations=2 * tokens * q)
    return (CostTerms(weights=gqa_params(config, n_heads_in_group)) + norm_and_residual(tokens, hidden)
            + matmul(tokens, hidden, q) + 2 * matmul(tokens, hidden, kv, into_cache=True) + core
            + matmul(tokens, q, hidden))


def gqa_params(config, n_heads_in_group: int) -> int:
    """Q, K, V and O weights (and biases), and the RMSNorm before them."""
    kv = config.num_attention_heads // n_heads_in_group
    q = config.num_attention_heads * head_dim(config)
    bias = 2 * q + 2 * kv * head_dim(config) if config.attention_bias else 0
    return 2 * q * config.hidden_size + 2 * kv * head_dim(config) * config.hidden_size + bias + config.hidden_size


class GQAttentionType(BuiltinJSON):
    name = "gqa"
    kind = "attention"

    def claims(self, entry: dict) -> bool:
        return not (is_set(entry, "no_op") or is_set(entry, "replace_with_linear"))

    def variants(self, config, space: SearchSpace) -> list[AttentionConfig]:
        parent_kv = config.num_key_value_heads
        kv_options = space.kv_heads or [k for k in range(parent_kv, 0, -1) if parent_kv % k == 0]
        kv_options = sorted({parent_kv, *(k for k in kv_options if parent_kv % k == 0)}, reverse=True)
        return [AttentionConfig(n_heads_in_group=config.num_attention_heads // k) for k in kv_options]

    def matches(self, cfg) -> bool:
        return isinstance(cfg, AttentionConfig) and not (cfg.no_op or cfg.replace_with_linear)

    def variant_name(self, cfg, config) -> str:
        return f"kv{config.num_attention_heads // cfg.n_heads_in_group}"

    def build(self, cfg, config):
        from hwopt.model.modeling_nemotron_nas import GroupedQueryAttention

        return GroupedQueryAttention(config, cfg.n_heads_in_group)

    def num_params(self, cfg, config) -> int:
        return gqa_params(config, cfg.n_heads_in_group)

    def kv_cache(self, cfg, config) -> KVCacheShape:
        """K and V of every token, per KV head."""
        return KVCacheShape((2, config.num_attention_heads // cfg.n_heads_in_group, head_dim(config)))

    def cost_terms(self, cfg, config, phase) -> CostTerms:
        return grouped_query_terms(config, cfg.n_heads_in_group, phase)

    @no_grad
    def init_from_parent(self, module, parent, x, position_embeddings) -> None:
        """Copy Q and O; each new KV head is the mean of the parent KV heads it replaces."""
        module.q_proj.load_state_dict(parent.q_proj.state_dict())
        module.o_proj.load_state_dict(parent.o_proj.state_dict())
        merge = parent.num_kv_heads // module.num_kv_heads
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(parent, name), getattr(module, name)
            w = src.weight.view(module.num_kv_heads, merge, parent.head_dim, -1).mean(dim=1)
            dst.weight.copy_(w.reshape_as(dst.weight))
            if src.bias is not None:
                dst.bias.copy_(src.bias.view(module.num_kv_heads, merge, -1).mean(dim=1).reshape(-1))


class SwiGLUType(BuiltinJSON):
    name = "swiglu"
    kind = "ffn"

    def claims(self, entry: dict) -> bool:
        return not (is_set(entry, "no_op") or is_set(entry, "replace_with_linear"))

    def variants(self, config, space: SearchSpace) -> list[FFNConfig]:
        parent = config.intermediate_size
        widths = {parent, *(ffn_width(parent, f) for f in space.ffn_fractions if 0 < f <= 1)} - {None}
        return [FFNConfig(intermediate_size=w) for w in sorted(widths, reverse=True)]

    def matches(self, cfg) -> bool:
        return isinstance(cfg, FFNConfig) and not (cfg.no_op or cfg.replace_with_linear)

    def variant_name(self, cfg, config) -> str:
        return f"ffn{cfg.intermediate_size}"

    def build(self, cfg, config):
        from hwopt.model.modeling_nemotron_nas import SwiGLU

        return SwiGLU(config, cfg.intermediate_size)

    def num_params(self, cfg, config) -> int:
        bias = 2 * cfg.intermediate_size + config.hidden_size if config.mlp_bias else 0
        return 3 * config.hidden_size * cfg.intermediate_size + bias + config.hidden_size

    def cost_terms(self, cfg, config, phase) -> CostTerms:
        """gate and up, silu(gate) * up (reads two, writes one), then down."""
        hidden, width, tokens = config.hidden_size, cfg.intermediate_size, phase.tokens
        product = CostTerms(flops=SILU_PRODUCT_FLOPS * tokens * width, activations=3 * tokens * width)
        return (CostTerms(weights=self.num_params(cfg, config)) + norm_and_residual(tokens, hidden)
                + 2 * matmul(tokens, hidden, width) + product + matmul(tokens, width, hidden))

    def kv_cache(self, cfg, config) -> KVCacheShape:
        return NO_CACHE

    @no_grad
    def init_from_parent(self, module, parent, x, position_embeddings) -> None:
        """Keep the channels that carry the most output: mean |silu(gate) * up| times |down column|."""
        import torch

        hidden = torch.nn.functional.silu(parent.gate_proj(x)) * parent.up_proj(x)
        importance = hidden.abs().reshape(-1, hidden.shape[-1]).mean(0) * parent.down_proj.weight.norm(dim=0)
        keep = importance.topk(module.gate_proj.out_features).indices.sort().values
        for name in ("gate_proj", "up_proj"):
            getattr(module, name).weight.copy_(getattr(parent, name).weight[keep])
            if getattr(parent, name).bias is not None:
                getattr(module, name).bias.copy_(getattr(parent, name).bias[keep])
        module.down_proj.weight.copy_(parent.down_proj.weight[:, keep])
        if parent.down_proj.bias is not None:
            module.down_proj.bias.copy_(parent.down_proj.bias)


class LinearType(BuiltinJSON):
    """A sub-block replaced by one hidden x hidden matrix, fitted by least squares to the parent's output."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"linear_{kind}"
        self._config = AttentionConfig if kind == "attention" else FFNConfig

    def variants(self, config, space: SearchSpace) -> list:
        return [self._config(replace_with_linear=True)] if space.linear else []

    def matches(self, cfg) -> bool:
        return isinstance(cfg, self._config) and cfg.replace_with_linear

    def claims(self, entry: dict) -> bool:
        return is_set(entry, "replace_with_linear") and not is_set(entry, "no_op")

    def variant_name(self, cfg, config) -> str:
        return "attn_linear" if self.kind == "attention" else "ffn_linear"

    def build(self, cfg, config):
        from hwopt.model.modeling_nemotron_nas import LinearAttention, LinearFFN

        return (LinearAttention if self.kind == "attention" else LinearFFN)(config)

    def num_params(self, cfg, config) -> int:
        return config.hidden_size * config.hidden_size + config.hidden_size

    def cost_terms(self, cfg, config, phase) -> CostTerms:
        """One hidden x hidden matmul, with the norm and residual it keeps."""
        tokens = phase.tokens
        return (CostTerms(weights=self.num_params(cfg, config)) + norm_and_residual(tokens, config.hidden_size)
                + matmul(tokens, config.hidden_size, config.hidden_size))

    def kv_cache(self, cfg, config) -> KVCacheShape:
        return NO_CACHE

    @no_grad
    def init_from_parent(self, module, parent, x, position_embeddings) -> None:
        target = parent(x, position_embeddings)
        module.linear.weight.copy_(least_squares_linear(x, target))


class NoOpType(BuiltinJSON):
    """A sub-block removed: no weights, no norm, nothing to compute."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"no_op_{kind}"
        self._config = AttentionConfig if kind == "attention" else FFNConfig

    def variants(self, config, space: SearchSpace) -> list:
        return [self._config(no_op=True)] if space.no_op else []

    def matches(self, cfg) -> bool:
        return isinstance(cfg, self._config) and cfg.no_op

    def claims(self, entry: dict) -> bool:
        return is_set(entry, "no_op")  # with replace_with_linear too, from_json says both are set

    def variant_name(self, cfg, config) -> str:
        return "attn_noop" if self.kind == "attention" else "ffn_noop"

    def build(self, cfg, config):
        return None

    def num_params(self, cfg, config) -> int:
        return 0

    def cost_terms(self, cfg, config, phase) -> CostTerms:
        return CostTerms()

    def kv_cache(self, cfg, config) -> KVCacheShape:
        return NO_CACHE

    def init_from_parent(self, module, parent, x, position_embeddings) -> None:
        pass


@hookimpl
def hwopt_register_block_types(register):
    for block_type in (GQAttentionType(), LinearType("attention"), NoOpType("attention"),
                       SwiGLUType(), LinearType("ffn"), NoOpType("ffn")):
        register(block_type)
