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

Needs transformers' ``LlamaConfig`` but not torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig

from hwopt.errors import HwoptError
from hwopt.model.config import BlockConfig, Fields, parent_block_config

NEMOTRON_NAS = "nemotron-nas"
NEMOTRON_NAS_MODEL_TYPES = (NEMOTRON_NAS, "deci")
NEMOTRON_NAS_ARCHITECTURE = "DeciLMForCausalLM"
LLAMA_FIELDS_NULLED_IN_CHILD = ("intermediate_size", "num_key_value_heads")
NOT_LLAMA_FIELDS = ("model_type", "architectures", "block_configs", "auto_map", "base_architecture")


def config_path(path: Path) -> Path:
    """``path`` itself when it is a file, else its ``config.json``."""
    path = Path(path)
    return path if path.is_file() else path / "config.json"


def read_architecture(path: Path, block_types) -> tuple[LlamaConfig, list[BlockConfig]]:
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


def architecture_from_dict(raw: dict, where: str, block_types) -> tuple[LlamaConfig, list[BlockConfig]]:
    """The Llama config and per-layer blocks of a parsed config.json; ``where`` names it in errors."""
    top = Fields(raw, where)
    nas = is_nemotron_nas(raw)
    if not nas and raw.get("model_type") != "llama":
        raise HwoptError(f"{where}: model_type {raw.get('model_type')!r} is not one hwopt reads (llama, "
                         f"nemotron-nas or deci, or architectures [{NEMOTRON_NAS_ARCHITECTURE!r}])")
    fields = {k: v for k, v in raw.items() if k not in NOT_LLAMA_FIELDS}
    check_llama_fields(top, sized=not nas)
    if not nas and raw.get("block_configs") is None:  # a plain Llama: the parent
        config = llama_config(fields, where)
        return config, [parent_block_config(config)] * config.num_hidden_layers
    blocks = read_block_configs(raw, where, block_types)
    if nas:  # the Llama fields a child leaves null get their largest per-layer value
        kv_groups = [g for b in blocks if (g := getattr(b.attention, "n_heads_in_group", None))]
        widths = [w for b in blocks if (w := getattr(b.ffn, "intermediate_size", None))]
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        fields["num_key_value_heads"] = heads // min(kv_groups, default=heads)
        fields["intermediate_size"] = max(widths, default=4 * hidden)
    return llama_config(fields, where), blocks


def check_llama_fields(top: Fields, sized: bool) -> None:
    """The top-level fields every reader relies on: types, ranges, and heads that divide the hidden size."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        top.positive_int(key)
    for key in ("max_position_embeddings", "head_dim"):
        top.positive_int(key, required=False)
    for key in ("rms_norm_eps", "rope_theta"):
        top.positive_number(key, required=False)
    top.flag("tie_word_embeddings")
    hidden, heads = top.raw["hidden_size"], top.raw["num_attention_heads"]
    if hidden % heads:
        top.fail("hidden_size", f"= {hidden} is not a multiple of num_attention_heads = {heads}")
    if sized:  # a Llama (or puzzletron) config: the parent's sizes
        top.positive_int("intermediate_size")
        kv = top.positive_int("num_key_value_heads", required=False) or heads
        if heads % kv:
            top.fail("num_key_value_heads", f"= {kv} does not divide num_attention_heads = {heads}")


def read_block_configs(raw: dict, where: str, block_types) -> list[BlockConfig]:
    layers, blocks = raw["num_hidden_layers"], raw.get("block_configs")
    if not isinstance(blocks, list):
        raise HwoptError(f"{where}: block_configs must be a list with one entry per layer, not {blocks!r}")
    if len(blocks) != layers:
        raise HwoptError(f"{where}: {len(blocks)} block_configs for {layers} layers (num_hidden_layers)")
    shape = SimpleNamespace(num_attention_heads=raw["num_attention_heads"], hidden_size=raw["hidden_size"])
    return [BlockConfig.from_json(b, shape, block_types, f"{where}: layer {i}") for i, b in enumerate(blocks)]


def llama_config(fields: dict, where: str) -> LlamaConfig:
    """transformers' LlamaConfig, its validation errors cut to one line naming the file."""
    try:
        return LlamaConfig(**fields)
    except (StrictDataclassError, TypeError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        field = next((line.split("'")[1] for line in lines if line.startswith("Validation error for field")), None)
        detail = lines[-1] if lines else type(exc).__name__
        raise HwoptError(f"{where}: {field + ': ' if field else ''}{detail}") from None
