"""Per-layer block configurations in `nemotron-nas` (DeciLM) semantics.

A child model is the parent's Llama config plus one ``BlockConfig`` per
layer. The JSON form is the ``block_configs`` entry of a nemotron-nas
``config.json`` (rules in shared/REFERENCES.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hwopt.errors import HwoptError


def head_dim(config) -> int:
    """Per-head width: the config's ``head_dim`` where it has one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The DeciLM rule: int(2 * mult * hidden / 3), rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return 256 * math.ceil(size / 256)


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    return round(intermediate_size * 3 / (2 * hidden_size), 6)


@dataclass(frozen=True)
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None  # query heads per KV head; None when no_op / linear

    def to_json(self) -> dict:
        return {
            "no_op": self.no_op,
            "replace_with_linear": self.replace_with_linear,
            "n_heads_in_group": self.n_heads_in_group,
        }

    @classmethod
    def from_json(cls, d: dict) -> AttentionConfig:
        cfg = cls(
            no_op=bool(d.get("no_op", False)),
            replace_with_linear=bool(d.get("replace_with_linear", False)),
            n_heads_in_group=None if d.get("n_heads_in_group") is None else int(d["n_heads_in_group"]),
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.no_op and self.replace_with_linear:
            raise HwoptError("attention block config has both no_op and replace_with_linear")
        if not (self.no_op or self.replace_with_linear) and not self.n_heads_in_group:
            raise HwoptError("attention block config needs n_heads_in_group")


@dataclass(frozen=True)
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    intermediate_size: int | None = None  # None when no_op / linear

    def to_json(self, hidden_size: int) -> dict:
        sized = self.intermediate_size is not None
        return {
            "no_op": self.no_op,
            "replace_with_linear": self.replace_with_linear,
            "ffn_mult": intermediate_size_to_ffn_mult(self.intermediate_size, hidden_size) if sized else None,
            "intermediate_size": self.intermediate_size,
        }

    @classmethod
    def from_json(cls, d: dict, hidden_size: int) -> FFNConfig:
        size = d.get("intermediate_size")
        if size is None and d.get("ffn_mult") is not None:
            size = ffn_mult_to_intermediate_size(float(d["ffn_mult"]), hidden_size)
        cfg = cls(
            no_op=bool(d.get("no_op", False)),
            replace_with_linear=bool(d.get("replace_with_linear", False)),
            intermediate_size=None if size is None else int(size),
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.no_op and self.replace_with_linear:
            raise HwoptError("ffn block config has both no_op and replace_with_linear")
        if not (self.no_op or self.replace_with_linear) and not self.intermediate_size:
            raise HwoptError("ffn block config needs ffn_mult or intermediate_size")


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    def to_json(self, hidden_size: int) -> dict:
        return {"attention": self.attention.to_json(), "ffn": self.ffn.to_json(hidden_size)}

    @classmethod
    def from_json(cls, d: dict, hidden_size: int) -> BlockConfig:
        try:
            return cls(AttentionConfig.from_json(d["attention"]), FFNConfig.from_json(d["ffn"], hidden_size))
        except (KeyError, TypeError, ValueError) as exc:
            raise HwoptError(f"malformed block config {d!r}: {exc}") from None


def sub_block_json(cfg: AttentionConfig | FFNConfig, hidden_size: int) -> dict:
    """The ``block_configs`` entry of one attention or FFN config."""
    return cfg.to_json(hidden_size) if isinstance(cfg, FFNConfig) else cfg.to_json()


def parent_block_config(llama_config) -> BlockConfig:
    """The block every layer of an unmodified Llama has."""
    return BlockConfig(
        AttentionConfig(n_heads_in_group=llama_config.num_attention_heads // llama_config.num_key_value_heads),
        FFNConfig(intermediate_size=llama_config.intermediate_size),
    )
