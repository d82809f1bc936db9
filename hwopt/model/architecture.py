"""Reading a model's architecture from a config.json, whichever tool wrote it.

One reader, used by every entry point (``hwopt estimate``, the passes,
``hwopt.load_model``), so a bad file gives the same one-line error
everywhere. Formats:

- Hugging Face Llama (``model_type: llama``): the parent; every layer has the parent's block.
- nemotron-nas (``architectures: ["DeciLMForCausalLM"]``; ``model_type`` ``nemotron-nas``, or
  ``deci`` in older files): the Llama fields, with ``intermediate_size`` and ``num_key_value_heads``
  null, plus one ``block_configs`` entry per layer.
- ModelOpt puzzletron's children (``model_type: llama``, ``architectures: ["AnyModel"]``): the parent's
  Llama config plus ``block_configs`` whose attention gives ``num_key_value_heads`` and whose FFN gives
  ``intermediate_size``.

Reading needs neither torch nor transformers: the result is a ``ModelConfig``
(the Llama fields hwopt reads, checked by ``check_llama_fields``), and
transformers' ``LlamaConfig`` is made from it only where a torch model is
built (``ModelConfig.transformers``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.model.config import BlockConfig, Fields, parent_block_config

if TYPE_CHECKING:
    from transformers import LlamaConfig

NEMOTRON_NAS = "nemotron-nas"
NEMOTRON_NAS_MODEL_TYPES = (NEMOTRON_NAS, "deci")
NEMOTRON_NAS_ARCHITECTURE = "DeciLMForCausalLM"
LLAMA_FIELDS_NULLED_IN_CHILD = ("intermediate_size", "num_key_value_heads")
NOT_LLAMA_FIELDS = ("model_type", "architectures", "block_configs", "auto_map", "base_architecture")
# the dtype names a config.json may give its weights (torch.<name>)
CONFIG_DTYPES = ("float32", "float16", "bfloat16", "float64", "float", "half", "double", "float8_e4m3fn",
                 "float8_e5m2", "auto")
# rope_type -> the keys its rope_scaling must hold (transformers' modeling_rope_utils; "type" is the old spelling)
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama architecture as hwopt reads it: the fields its costs, block types and models use.

    Defaults are transformers' ``LlamaConfig`` defaults. Sizes are counts
    (``head_dim`` in channels, ``max_position_embeddings`` in tokens);
    ``rope_scaling`` is None for plain RoPE. ``fields`` keeps every Llama
    field of the file as given, to build transformers' config from.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    fields: dict = field(default_factory=dict, hash=False, repr=False)
    where: str = field(default="config", compare=False, repr=False)  # the file it came from, for errors

    def transformers(self) -> LlamaConfig:
        """transformers' ``LlamaConfig`` of these fields (imports transformers).

        Raises:
            HwoptError: one line, should transformers refuse a field that ``check_llama_fields`` let through.
        """
        from huggingface_hub.errors import StrictDataclassError
        from transformers import LlamaConfig

        try:
            return LlamaConfig(**self.fields)
        except (StrictDataclassError, TypeError, ValueError, KeyError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            name = next((line.split("'")[1] for line in lines if line.startswith("Validation error for field")), None)
            detail = lines[-1] if lines else type(exc).__name__
            raise HwoptError(f"{self.where}: {name + ': ' if name else ''}{detail}") from None


def transformers_config(config) -> LlamaConfig:
    """transformers' ``LlamaConfig`` for a ``ModelConfig``; a ``LlamaConfig`` is returned as it is."""
    return config.transformers() if isinstance(config, ModelConfig) else config


def config_path(path: Path) -> Path:
    """``path`` itself when it is a file, else its ``config.json``."""
    path = Path(path)
    return path if path.is_file() else path / "config.json"


def read_architecture(path: Path, block_types) -> tuple[ModelConfig, list[BlockConfig]]:
    """The Llama config and per-layer blocks of a model directory or config.json.

    ``block_types`` (``hwopt.plugins.BlockTypes``) read each ``block_configs`` entry.

    Raises:
        HwoptError: one line naming the file (and the layer and key where there is one) when the
            file is missing, not JSON, of a format hwopt does not read, or has an invalid field.
    """
    file = config_path(path)
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise HwoptError(f"{path} has no config.json: not a Hugging Face model directory") from None
    except json.JSONDecodeError as exc:
        raise HwoptError(f"{file} is not valid JSON: {exc}") from None
    return architecture_from_dict(raw, str(file), block_types)


def is_nemotron_nas(raw: dict) -> bool:
    """Readers recognise the format by its architecture; older files say ``model_type: deci``."""
    return NEMOTRON_NAS_ARCHITECTURE in (raw.get("architectures") or []) or raw.get("model_type") in \
        NEMOTRON_NAS_MODEL_TYPES


def architecture_from_dict(raw: dict, where: str, block_types) -> tuple[ModelConfig, list[BlockConfig]]:
    """The Llama config and per-layer blocks of a parsed config.json; ``where`` names it in errors."""
    top = Fields(raw, where)
    nas = is_nemotron_nas(raw)
    if not nas and raw.get("model_type") != "llama":
        raise HwoptError(f"{where}: model_type {raw.get('model_type')!r} is not one hwopt reads (llama, "
                         f"nemotron-nas or deci, or architectures [{NEMOTRON_NAS_ARCHITECTURE!r}])")
    fields = {k: v for k, v in raw.items() if k not in NOT_LLAMA_FIELDS}
    check_llama_fields(top, sized=not nas)
    if not nas and raw.get("block_configs") is None:  # a plain Llama: the parent
        config = model_config(fields, where)
        return config, [parent_block_config(config)] * config.num_hidden_layers
    blocks = read_block_configs(raw, where, block_types)
    if nas:  # the Llama fields a child leaves null get their largest per-layer value
        kv_groups = [g for b in blocks if (g := getattr(b.attention, "n_heads_in_group", None))]
        widths = [w for b in blocks if (w := getattr(b.ffn, "intermediate_size", None))]
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        fields["num_key_value_heads"] = heads // min(kv_groups, default=heads)
        fields["intermediate_size"] = max(widths, default=4 * hidden)
    return model_config(fields, where), blocks


def model_config(fields: dict, where: str) -> ModelConfig:
    """A ``ModelConfig`` of checked Llama fields (``check_llama_fields``), with transformers' defaults.

    A ``rope_parameters`` dict (transformers 5's spelling) gives ``rope_theta`` and ``rope_scaling``.
    """
    rope = dict(fields.get("rope_parameters") or fields.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = fields.get("rope_theta") or rope.get("rope_theta") or ModelConfig.rope_theta
    heads = fields["num_attention_heads"]
    given = {key: fields[key] for key in ("max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                                          "attention_bias", "mlp_bias") if fields.get(key) is not None}
    return ModelConfig(
        vocab_size=fields["vocab_size"], hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"], num_hidden_layers=fields["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=fields.get("num_key_value_heads") or heads,
        head_dim=fields.get("head_dim") or fields["hidden_size"] // heads, rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        fields=fields, where=where, **given)


def check_llama_fields(top: Fields, sized: bool) -> None:
    """Every top-level field transformers' ``LlamaConfig`` checks, and the sizes every reader relies on.

    Types, ranges, heads that divide the hidden size, and a ``rope_scaling`` (or ``rope_parameters``) whose
    ``rope_type`` transformers knows and which holds that type's keys.
    """
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        top.positive_int(key)
    for key in ("max_position_embeddings", "head_dim"):
        top.positive_int(key, required=False)
    for key in ("rms_norm_eps", "rope_theta"):
        top.positive_number(key, required=False)
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache"):
        top.flag(key)
    top.text("hidden_act")
    top.fraction("initializer_range")
    top.fraction("attention_dropout")
    top.token_ids("pad_token_id", several=False)
    top.token_ids("bos_token_id", several=False)
    top.token_ids("eos_token_id", several=True)
    top.positive_int("pretraining_tp", required=False)
    for key in ("torch_dtype", "dtype"):
        top.one_of(key, CONFIG_DTYPES)
    for key in ("rope_scaling", "rope_parameters"):
        check_rope(top, key)
    hidden, heads = top.raw["hidden_size"], top.raw["num_attention_heads"]
    if hidden % heads:
        top.fail("hidden_size", f"= {hidden} is not a multiple of num_attention_heads = {heads}")
    if sized:  # a Llama (or puzzletron) config: the parent's sizes
        top.positive_int("intermediate_size")
        kv = top.positive_int("num_key_value_heads", required=False) or heads
        if heads % kv:
            top.fail("num_key_value_heads", f"= {kv} does not divide num_attention_heads = {heads}")


def check_rope(top: Fields, key: str) -> None:
    """A RoPE scaling dict (or null): a known ``rope_type`` (or ``type``), its required keys, a factor >= 1."""
    rope = top.raw.get(key)
    if rope is None:
        return
    if not isinstance(rope, dict):
        top.fail(key, f"= {rope!r} must be a JSON object or null")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_REQUIRED_KEYS:
        top.fail(key, f"has rope_type {rope_type!r}; a Llama takes one of {', '.join(ROPE_REQUIRED_KEYS)}")
    if missing := [k for k in ROPE_REQUIRED_KEYS[rope_type] if rope.get(k) is None]:
        top.fail(key, f"of rope_type {rope_type!r} is missing {', '.join(missing)}")
    rope_fields = Fields(rope, top.where, f"{key}.")
    factor = rope_fields.positive_number("factor", required=False)
    if factor is not None and factor < 1:
        rope_fields.fail("factor", f"= {factor:g} must be at least 1")
    for name in ("low_freq_factor", "high_freq_factor", "rope_theta"):
        rope_fields.positive_number(name, required=False)
    rope_fields.positive_int("original_max_position_embeddings", required=False)


def read_block_configs(raw: dict, where: str, block_types) -> list[BlockConfig]:
    layers, blocks = raw["num_hidden_layers"], raw.get("block_configs")
    if not isinstance(blocks, list):
        raise HwoptError(f"{where}: block_configs must be a list with one entry per layer, not {blocks!r}")
    if len(blocks) != layers:
        raise HwoptError(f"{where}: {len(blocks)} block_configs for {layers} layers (num_hidden_layers)")
    shape = SimpleNamespace(num_attention_heads=raw["num_attention_heads"], hidden_size=raw["hidden_size"])
    return [BlockConfig.from_json(b, shape, block_types, f"{where}: layer {i}") for i, b in enumerate(blocks)]


def nemotron_nas_config(config: ModelConfig | LlamaConfig, blocks: list[BlockConfig], block_types) -> dict:
    """The config.json of a child: the parent's Llama fields (as transformers writes them; imports transformers)
    and one ``block_configs`` entry per layer."""
    out = transformers_config(config).to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype"):
        out.pop(key, None)
    rope = dict(out.get("rope_parameters") or {})
    out["rope_theta"] = rope.get("rope_theta")
    out["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    out.update({k: None for k in LLAMA_FIELDS_NULLED_IN_CHILD})
    out["model_type"] = NEMOTRON_NAS
    out["architectures"] = ["DeciLMForCausalLM"]
    out["block_configs"] = [b.to_json(block_types, config) for b in blocks]
    out["torch_dtype"] = "float32"
    return out
