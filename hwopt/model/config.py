"""Per-layer block configurations in `nemotron-nas` (DeciLM) semantics, read and checked.

A child model is the parent's Llama config plus one ``BlockConfig`` per
layer. The JSON form is the ``block_configs`` entry of a nemotron-nas
``config.json`` (rules in shared/REFERENCES.md); ModelOpt puzzletron's
spelling of the same thing (``num_key_value_heads`` for the attention,
``intermediate_size`` alone for the FFN) is read too.

Every field is checked when it is read, and a bad one is one error line
that names the file, the layer and the key, e.g.
``config.json: layer 0: attention.n_heads_in_group = 5 does not divide the 16 attention heads``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from hwopt.errors import HwoptError

FFN_MULT_GRID = 256  # readers that rebuild the FFN width from ffn_mult round it up to a multiple of this

# Keys of other tools' block configs that the built-in block types cannot honour unless they hold their neutral
# value (None or False). An entry that sets one is read only by a block type that claims it (a plugin's); with none
# installed it is refused with this reason, rather than silently run without it.
UNSUPPORTED_WHEN_SET = {
    "attention": {
        "window_length": "sliding-window attention needs the hwopt-sliding-window plugin (pip install "
                         "./plugins/hwopt-sliding-window)",
        "num_sink_tokens": "attention sink tokens are not supported",
        "sparsify": "sparsified attention weights are not supported",
        "use_prefill_window_in_sink_attention": "sink attention is not supported",
        "unshifted_sink": "sink attention is not supported",
        "mamba": "Mamba layers are not supported",
        "llama4": "Llama-4 attention is not supported",
    },
    "ffn": {
        "sparsify": "sparsified FFN weights are not supported",
        "moe": "mixture-of-experts FFNs are not supported",
    },
    "block": {"parallel_blocks": "parallel blocks are not supported"},
}
# Keys that describe a sub-block without changing what it computes here.
INFORMATIONAL = {"attention": {"weights_precision"}, "ffn": {"weights_precision"}, "block": set()}


def head_dim(config) -> int:
    """Per-head width: the config's ``head_dim`` where it has one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The DeciLM rule: int(2 * mult * hidden / 3), rounded up to a multiple of 256.

    Source: vLLM ``nemotron_nas.py`` and TensorRT-LLM ``models/nemotron_nas``
    (``_ffn_mult_to_intermediate_size``); llama.cpp's converter and mlx-lm use the same.
    """
    size = int(2 * ffn_mult * hidden_size / 3)
    return FFN_MULT_GRID * math.ceil(size / FFN_MULT_GRID)


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    """The ``ffn_mult`` written for a width; the rule above gives the width back exactly when it is on the grid."""
    return round(intermediate_size * 3 / (2 * hidden_size), 6)


def rebuilt_by_ffn_mult(intermediate_size: int, hidden_size: int) -> int:
    """The width a reader that uses only ``ffn_mult`` builds for a width hwopt writes."""
    return ffn_mult_to_intermediate_size(intermediate_size_to_ffn_mult(intermediate_size, hidden_size), hidden_size)


class Fields:
    """Typed reads of one JSON object; each bad value is one error line naming ``where`` and the key.

    ``where`` locates the object (``"config.json: layer 3: attention"``); a
    key's name in messages is ``prefix + key`` (``attention.no_op``).
    """

    def __init__(self, raw, where: str, prefix: str = ""):
        self.where, self.prefix = where, prefix
        if not isinstance(raw, dict):
            raise HwoptError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a JSON object, not {raw!r}")
        self.raw = raw

    def fail(self, key: str, problem: str):
        raise HwoptError(f"{self.where}: {self.prefix}{key} {problem}")

    def flag(self, key: str) -> bool:
        """A boolean; absent or null is False."""
        value = self.raw.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(key, f"= {value!r} must be true or false")
        return value

    def value(self, key: str, required: bool, what: str):
        """The raw value (None when absent or null); a missing required key is an error saying ``what`` it takes."""
        value = self.raw.get(key)
        if value is None and required:
            self.fail(key, f"is missing ({what})")
        return value

    def positive_int(self, key: str, required: bool = True) -> int | None:
        value = self.value(key, required, "a positive integer")
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(key, f"= {value!r} must be a positive integer")
        return value

    def positive_number(self, key: str, required: bool = True) -> float | None:
        value = self.value(key, required, "a positive number")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            self.fail(key, f"= {value!r} must be a positive number")
        return float(value)

    def text(self, key: str) -> str | None:
        """A string, or None when absent or null."""
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            self.fail(key, f"= {value!r} must be a string")
        return value

    def fraction(self, key: str) -> float | None:
        """A number from 0 to 1, or None when absent or null."""
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            self.fail(key, f"= {value!r} must be a number from 0 to 1")
        return float(value)

    def token_ids(self, key: str, several: bool) -> int | list[int] | None:
        """A token id (an integer; some files use -1 for none), a list of them where ``several``, or None."""
        value = self.raw.get(key)
        ids = value if several and isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            self.fail(key, f"= {value!r} must be a token id (an integer){' or a list of them' * several}")
        return value

    def one_of(self, key: str, allowed: tuple[str, ...]) -> str | None:
        """One of ``allowed``, or None when absent or null."""
        value = self.raw.get(key)
        if value is not None and value not in allowed:
            self.fail(key, f"= {value!r} must be one of {', '.join(allowed)}")
        return value

    def check_foreign_keys(self, kind: str, known: set[str]) -> None:
        """Refuse keys that would change the block and that hwopt cannot honour; warn about unknown ones."""
        for key, value in self.raw.items():
            if key in known or key in INFORMATIONAL[kind] or value in (None, False):
                continue
            if key in UNSUPPORTED_WHEN_SET[kind]:
                self.fail(key, f"= {value!r}: {UNSUPPORTED_WHEN_SET[kind][key]}")
            warnings.warn(f"{self.where}: {self.prefix}{key} = {value!r} is not a key hwopt knows; it is ignored",
                          stacklevel=2)


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
    def from_json(cls, d: dict, num_attention_heads: int, where: str = "attention config") -> AttentionConfig:
        """Read an attention entry (nemotron-nas ``n_heads_in_group`` or puzzletron ``num_key_value_heads``).

        Raises:
            HwoptError: one line naming ``where`` and the key, for a wrong type, both flags set, a missing,
                zero or indivisible group size, or a setting hwopt cannot honour (sliding window, sinks, ...).
        """
        f = Fields(d, where, "attention.")
        no_op, linear = f.flag("no_op"), f.flag("replace_with_linear")
        f.check_foreign_keys("attention", {"no_op", "replace_with_linear", "n_heads_in_group", "num_key_value_heads"})
        if no_op and linear:
            f.fail("no_op", "and attention.replace_with_linear are both true; a sub-block is one or the other")
        if no_op or linear:  # the size fields mean nothing then (NVIDIA's readers null them too)
            return cls(no_op=no_op, replace_with_linear=linear)
        group, kv_heads = f.positive_int("n_heads_in_group", False), f.positive_int("num_key_value_heads", False)
        if group is None and kv_heads is None:
            f.fail("n_heads_in_group", "is missing (or num_key_value_heads): attention that is neither no_op nor "
                                       "replace_with_linear needs its KV-head grouping")
        if kv_heads is not None:
            if num_attention_heads % kv_heads:
                f.fail("num_key_value_heads", f"= {kv_heads} does not divide the {num_attention_heads} attention heads")
            if group is not None and group != num_attention_heads // kv_heads:
                f.fail("n_heads_in_group", f"= {group} disagrees with num_key_value_heads = {kv_heads} "
                                           f"({num_attention_heads} heads)")
            group = num_attention_heads // kv_heads
        if group > num_attention_heads:
            f.fail("n_heads_in_group", f"= {group} is more than the {num_attention_heads} attention heads "
                                       f"(zero KV heads)")
        if num_attention_heads % group:
            f.fail("n_heads_in_group", f"= {group} does not divide the {num_attention_heads} attention heads")
        return cls(n_heads_in_group=group)



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
    def from_json(cls, d: dict, hidden_size: int, where: str = "ffn config") -> FFNConfig:
        """Read an FFN entry: ``intermediate_size`` where given (the tensors' width), else the ``ffn_mult`` rule.

        Raises:
            HwoptError: one line naming ``where`` and the key, for a wrong type, both flags set, a missing,
                zero or negative width, or a setting hwopt cannot honour (MoE, sparsity, a non-gated FFN).
        """
        f = Fields(d, where, "ffn.")
        no_op, linear = f.flag("no_op"), f.flag("replace_with_linear")
        f.check_foreign_keys("ffn", {"no_op", "replace_with_linear", "ffn_mult", "intermediate_size", "gated",
                                     "hidden_act"})
        if d.get("gated") is False:
            f.fail("gated", "= false: only gated (SwiGLU) FFNs are supported")
        if d.get("hidden_act") not in (None, "silu"):
            f.fail("hidden_act", f"= {d['hidden_act']!r}: only silu (SwiGLU) FFNs are supported")
        if no_op and linear:
            f.fail("no_op", "and ffn.replace_with_linear are both true; a sub-block is one or the other")
        if no_op or linear:
            return cls(no_op=no_op, replace_with_linear=linear)
        size, mult = f.positive_int("intermediate_size", False), f.positive_number("ffn_mult", False)
        if size is None and mult is None:
            f.fail("ffn_mult", "is missing (or intermediate_size): an FFN that is neither no_op nor "
                               "replace_with_linear needs its width")
        return cls(intermediate_size=size if size is not None else ffn_mult_to_intermediate_size(mult, hidden_size))



@dataclass(frozen=True)
class BlockConfig:
    """One layer: its attention's and its FFN's config, each owned by the block type that ``matches`` it.

    Reading and writing the ``block_configs`` JSON goes through a block-type
    collection handed in (``hwopt.plugins.BlockTypes``: ``to_json(cfg,
    model_config)`` and ``from_json(kind, entry, model_config, where)``), so
    that a plugin's sub-block keeps its own settings.
    """

    attention: object
    ffn: object

    def to_json(self, block_types, model_config) -> dict:
        return {"attention": block_types.to_json(self.attention, model_config),
                "ffn": block_types.to_json(self.ffn, model_config)}

    @classmethod
    def from_json(cls, d: dict, model_config, block_types, where: str = "block config") -> BlockConfig:
        """One ``block_configs`` entry of a model with ``model_config``'s heads and hidden size.

        Raises:
            HwoptError: one line naming ``where`` (file and layer) and the key of the first bad field.
        """
        f = Fields(d, where)
        f.check_foreign_keys("block", {"attention", "ffn"})
        for key in ("attention", "ffn"):
            if key not in d:
                f.fail(key, "is missing")
        return cls(block_types.from_json("attention", d["attention"], model_config, where),
                   block_types.from_json("ffn", d["ffn"], model_config, where))


def parent_block_config(llama_config) -> BlockConfig:
    """The block every layer of an unmodified Llama has."""
    return BlockConfig(
        AttentionConfig(n_heads_in_group=llama_config.num_attention_heads // llama_config.num_key_value_heads),
        FFNConfig(intermediate_size=llama_config.intermediate_size),
    )

