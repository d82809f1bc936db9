"""An example hwopt block type: sliding-window attention, attending to the last W tokens only.

A variant keeps the parent's query and KV heads and its weights; only what
each token sees changes, the W most recent tokens (itself included), so the
KV cache never holds more than W tokens per sequence. Which windows are
offered is the search-space option ``--window`` (``--window 64,256``); a run
uses this block type when it names the plugin (``--block-types sliding_window``).

The ``block_configs`` entry is NVIDIA's nemotron-nas spelling:
``{"no_op": false, "replace_with_linear": false, "n_heads_in_group": 4, "window_length": 256}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import hwopt
from hwopt.builtin.block_types import ATTENTION_KEYS, gqa_params, grouped_query_terms, is_set
from hwopt.errors import HwoptError
from hwopt.model.config import AttentionConfig, Fields, head_dim
from hwopt.model.modeling_nemotron_nas import GroupedQueryAttention
from hwopt.protocols import KVCacheShape


@dataclass(frozen=True)
class SlidingWindowConfig:
    n_heads_in_group: int  # query heads per KV head, as in grouped-query attention
    window_length: int  # tokens each token attends to (itself included); the most the KV cache keeps


class SlidingWindowAttention(GroupedQueryAttention):
    """Grouped-query attention in which the token at position p sees positions p - W + 1 .. p."""

    def __init__(self, config, n_heads_in_group: int, window_length: int):
        super().__init__(config, n_heads_in_group)
        self.window_length = window_length

    def forward(self, x, position_embeddings, cache=None, layer_idx: int = 0, attention_mask=None):
        if attention_mask is not None:
            raise HwoptError("sliding-window attention takes no padding mask: give it unpadded sequences")
        batch, seq, _ = x.shape
        q, k, v = self.project(x, position_embeddings)
        kept = 0  # cached tokens, the most recent ones: they sit just before the new tokens
        if cache is not None:
            kept = 0 if cache.keys[layer_idx] is None else cache.keys[layer_idx].shape[2]
            k, v = cache.update(k, v, layer_idx)
            cache.keys[layer_idx] = k[:, :, -self.window_length:]
            cache.values[layer_idx] = v[:, :, -self.window_length:]
        query = torch.arange(kept, kept + seq, device=x.device).unsqueeze(1)
        key = torch.arange(kept + seq, device=x.device).unsqueeze(0)
        mask = (key <= query) & (key > query - self.window_length)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class SlidingWindowType:
    """Attention over the last ``window_length`` tokens; the parent's heads and weights."""

    name = "sliding_window"
    kind = "attention"
    keys = ATTENTION_KEYS | {"window_length"}
    options = {"window": "sliding-window attention variants attending to the last W tokens, e.g. 64,256"}

    def variants(self, config, space) -> list[SlidingWindowConfig]:
        group = config.num_attention_heads // config.num_key_value_heads
        return [SlidingWindowConfig(group, int(w)) for w in sorted(set(space.option("window")), reverse=True)]

    def variant_name(self, cfg, config) -> str:
        return f"window{cfg.window_length}"

    def matches(self, cfg) -> bool:
        return isinstance(cfg, SlidingWindowConfig)

    def claims(self, entry: dict) -> bool:
        return is_set(entry, "window_length") and not (is_set(entry, "no_op") or is_set(entry, "replace_with_linear"))

    def to_json(self, cfg, config) -> dict:
        return {"no_op": False, "replace_with_linear": False, "n_heads_in_group": cfg.n_heads_in_group,
                "window_length": cfg.window_length}

    def from_json(self, entry: dict, config, where: str) -> SlidingWindowConfig:
        """The grouping is read (and checked) as grouped-query attention's; ``window_length`` a positive int."""
        window = Fields(entry, where, "attention.").positive_int("window_length")
        rest = {k: v for k, v in entry.items() if k != "window_length"}
        return SlidingWindowConfig(AttentionConfig.from_json(rest, config.num_attention_heads, where).n_heads_in_group,
                                   window)

    def build(self, cfg, config) -> SlidingWindowAttention:
        return SlidingWindowAttention(config, cfg.n_heads_in_group, cfg.window_length)

    @torch.no_grad()
    def init_from_parent(self, module, parent, x, position_embeddings) -> None:
        """The parent's weights, unchanged (the parent's attention has the same heads)."""
        module.load_state_dict(parent.state_dict())

    def num_params(self, cfg, config) -> int:
        return gqa_params(config, cfg.n_heads_in_group)

    def kv_cache(self, cfg, config) -> KVCacheShape:
        """K and V per KV head, for at most ``window_length`` tokens."""
        kv_heads = config.num_attention_heads // cfg.n_heads_in_group
        return KVCacheShape((2, kv_heads, head_dim(config)), max_tokens=cfg.window_length)

    def cost_terms(self, cfg, config, phase):
        return grouped_query_terms(config, cfg.n_heads_in_group, phase, window=cfg.window_length)


@hwopt.hookimpl
def hwopt_register_block_types(register):
    register(SlidingWindowType())
