"""The variants a library offers per layer, and the serving scenario costs are measured in."""

from __future__ import annotations

from dataclasses import dataclass

from hwopt.errors import HwoptError


@dataclass(frozen=True)
class SearchSpace:
    """Which variants the library offers per layer (the parent's own block is always in).

    ``block_type_plugins`` names the plugins whose block types the run uses
    besides the built-ins (none by default); ``options`` holds the values of
    the search-space options those block types take (``--window 64,256``).
    """

    kv_heads: tuple[int, ...] | None = None  # None: every divisor of the parent's KV heads
    ffn_fractions: tuple[float, ...] = (0.75, 0.5, 0.25)
    linear: bool = True
    no_op: bool = True
    block_type_plugins: tuple[str, ...] = ()
    options: tuple[tuple[str, tuple], ...] = ()  # (option name, values), e.g. (("window", (64, 256)),)

    def option(self, name: str, default: tuple = ()) -> tuple:
        """The values given for a block type's option, or ``default``."""
        return dict(self.options).get(name, default)

    def block_types(self):
        """The block types this space draws its variants from (``hwopt.plugins.BlockTypes``)."""
        from hwopt.plugins import block_types

        return block_types().select(self.block_type_plugins)


@dataclass(frozen=True)
class SubVariant:
    """One attention or FFN choice for a layer, with the block type that builds it."""

    kind: str  # "attention" or "ffn"
    name: str  # e.g. "kv1", "ffn768", "attn_linear"
    config: object  # the block type's own config (hwopt.protocols.BlockType)
    block_type: object

    def to_json(self, model_config) -> dict:
        """Its ``block_configs`` entry."""
        return self.block_type.to_json(self.config, model_config)


def sub_variants(config, space: SearchSpace, kind: str) -> list[SubVariant]:
    """Every variant of one kind that the space's block types offer for a parent config."""
    out = []
    for block_type in space.block_types().of_kind(kind):
        for cfg in block_type.variants(config, space):
            out.append(SubVariant(kind, block_type.variant_name(cfg, config), cfg, block_type))
    return out


def sub_variant_of(config, cfg) -> SubVariant:
    """The variant (and its block type, among every installed one) for one given sub-block config."""
    from hwopt.plugins import block_types

    block_type = block_types().of(cfg)
    return SubVariant(block_type.kind, block_type.variant_name(cfg, config), cfg, block_type)


def sub_variant_from_json(kind: str, entry: dict, config, where: str) -> SubVariant:
    """The variant a ``block_configs``-style entry describes (library index, calibration rows)."""
    from hwopt.plugins import block_types

    return sub_variant_of(config, block_types().from_json(kind, entry, config, where))


def model_sub_variants(source) -> list[tuple[SubVariant, SubVariant]]:
    """The attention and FFN variant of every layer of a model (``source``: a ``hwopt.model_source.ModelSource``)."""
    config = source.architecture
    return [(sub_variant_of(config, b.attention), sub_variant_of(config, b.ffn)) for b in source.block_configs]


def block_variant_name(attention: str, ffn: str) -> str:
    """A block-library variant: one attention and one FFN variant, e.g. ``kv1+ffn768``."""
    return f"{attention}+{ffn}"


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class Scenario:
    """A serving workload: ``batch`` prompts of ``input_len`` tokens, each generating ``output_len``.

    Runtime is prefill plus ``output_len - 1`` decode steps for the whole
    batch (prefill yields the first token, so time to first token is the
    prefill). Throughput counts input and output tokens, as NVIDIA's Puzzle
    demo does: runtime_ms = batch * (input + output) / tokens_per_s * 1000.
    Weights and activations are in ``dtype``, the KV cache in ``kv_dtype``.
    """

    batch: int = 1
    input_len: int = 128
    output_len: int = 64
    dtype: str = "fp32"
    kv_dtype: str = "fp32"

    @classmethod
    def parse(cls, lengths: str, batch: int = 1, dtype: str = "fp32", kv_dtype: str | None = None) -> Scenario:
        try:
            input_len, output_len = (int(x) for x in lengths.split("/"))
        except ValueError:
            raise HwoptError(f"--scenario takes INPUT/OUTPUT token counts such as 128/64, not {lengths!r}") from None
        if min(input_len, output_len, batch) < 1:
            raise HwoptError("scenario lengths and batch must be positive")
        kv_dtype = kv_dtype or dtype
        for flag, value in (("--dtype", dtype), ("--kv-dtype", kv_dtype)):
            if value not in DTYPE_BYTES:
                raise HwoptError(f"unknown {flag} {value!r} (known: {', '.join(DTYPE_BYTES)})")
        return cls(batch, input_len, output_len, dtype, kv_dtype)

    @classmethod
    def for_target(cls, target, lengths: str, batch: int = 1, dtype: str | None = None,
                   kv_dtype: str | None = None) -> Scenario:
        """A scenario on ``target``: its default dtype unless told, and only dtypes it computes in."""
        scenario = cls.parse(lengths, batch, dtype or target.default_dtype(), kv_dtype)
        target.check_dtype(scenario.dtype)
        target.check_dtype(scenario.kv_dtype, "--kv-dtype")
        return scenario

    @classmethod
    def from_json(cls, data: dict) -> Scenario:
        """The scenario a costs.json was made for (files from before ``kv_dtype`` use ``dtype``)."""
        return cls(**{"kv_dtype": data["dtype"], **data})

    @property
    def decode_steps(self) -> int:
        return self.output_len - 1

    @property
    def max_context(self) -> int:
        return self.input_len + self.output_len

    @property
    def bytes_per_element(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_element(self) -> int:
        return DTYPE_BYTES[self.kv_dtype]

    def runtime_ms_for_throughput(self, tokens_per_s: float) -> float:
        return self.batch * self.max_context / tokens_per_s * 1000

    def throughput(self, runtime_ms: float) -> float:
        return self.batch * self.max_context / runtime_ms * 1000

    @staticmethod
    def tokens_per_s_text(tokens_per_s: float) -> str:
        """A throughput as printed: three significant figures below 100 tokens/s (a slow CPU's 0.42 is not "0"),
        whole tokens above."""
        return f"{tokens_per_s:,.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"

    def describe(self) -> str:
        kv = f", KV cache {self.kv_dtype}" if self.kv_dtype != self.dtype else ""
        return f"batch {self.batch}, {self.input_len}/{self.output_len} tokens, {self.dtype}{kv}"

    def to_json(self) -> dict:
        return {"batch": self.batch, "input_len": self.input_len, "output_len": self.output_len, "dtype": self.dtype,
                "kv_dtype": self.kv_dtype}
