"""Reading Llama and nemotron-nas checkpoints, and writing nemotron-nas ones.

A Hugging Face Llama directory is read as the parent (every block the
parent's); a nemotron-nas directory (``model_type: nemotron-nas``,
``block_configs``) as a child. Writers keep both the transformers 5 rope
fields and the older ``rope_theta``/``rope_scaling`` that vLLM, TensorRT-LLM
and llama.cpp read, and store ``intermediate_size`` next to ``ffn_mult``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig

from hwopt.errors import HwoptError
from hwopt.model.config import BlockConfig, parent_block_config
from hwopt.model.modeling import HeteroLlamaForCausalLM

NEMOTRON_NAS = "nemotron-nas"
LLAMA_FIELDS_NULLED_IN_CHILD = ("intermediate_size", "num_key_value_heads")


def read_architecture(directory: Path) -> tuple[LlamaConfig, list[BlockConfig]]:
    """The Llama config and per-layer blocks of a Llama or nemotron-nas directory (or its config.json)."""
    path = Path(directory) if Path(directory).is_file() else Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HwoptError(f"{directory} has no config.json: not a Hugging Face model directory") from None
    except json.JSONDecodeError as exc:
        raise HwoptError(f"{path} is not valid JSON: {exc}") from None
    return architecture_from_dict(raw, str(path))


def architecture_from_dict(raw: dict, where: str) -> tuple[LlamaConfig, list[BlockConfig]]:
    model_type = raw.get("model_type")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "block_configs", "auto_map")}
    if model_type == "llama":
        config = LlamaConfig(**fields)
        return config, [parent_block_config(config)] * config.num_hidden_layers
    if model_type == NEMOTRON_NAS:
        hidden = fields["hidden_size"]
        blocks = [BlockConfig.from_json(b, hidden) for b in raw.get("block_configs") or []]
        if len(blocks) != fields.get("num_hidden_layers"):
            raise HwoptError(f"{where}: {len(blocks)} block_configs for {fields.get('num_hidden_layers')} layers")
        # The Llama fields a child leaves null get their largest per-layer value.
        kv_groups = [b.attention.n_heads_in_group for b in blocks if b.attention.n_heads_in_group]
        widths = [b.ffn.intermediate_size for b in blocks if b.ffn.intermediate_size]
        heads = fields["num_attention_heads"]
        fields["num_key_value_heads"] = heads // min(kv_groups, default=heads)
        fields["intermediate_size"] = max(widths, default=4 * hidden)
        return LlamaConfig(**fields), blocks
    raise HwoptError(f"{where}: model_type {model_type!r} is neither 'llama' nor 'nemotron-nas'")


def nemotron_nas_config(config: LlamaConfig, blocks: list[BlockConfig]) -> dict:
    out = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype"):
        out.pop(key, None)
    rope = dict(out.get("rope_parameters") or {})
    out["rope_theta"] = rope.get("rope_theta")
    out["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    out.update({k: None for k in LLAMA_FIELDS_NULLED_IN_CHILD})
    out["model_type"] = NEMOTRON_NAS
    out["architectures"] = ["DeciLMForCausalLM"]
    out["block_configs"] = [b.to_json(config.hidden_size) for b in blocks]
    out["torch_dtype"] = "float32"
    return out


def load_weights(model: HeteroLlamaForCausalLM, directory: Path) -> None:
    """Load every ``*.safetensors`` file of a directory into the model, strictly."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise HwoptError(f"{directory} has no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HwoptError(f"weights in {directory} do not fit the architecture: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_checkpoint(directory: Path) -> HeteroLlamaForCausalLM:
    config, blocks = read_architecture(directory)
    model = HeteroLlamaForCausalLM(config, blocks)
    load_weights(model, directory)
    return model.eval()


def save_nemotron_nas(model: HeteroLlamaForCausalLM, directory: Path, tokenizer=None,
                      dtype: torch.dtype = torch.float32, max_shard_size: int | str = "5GB") -> None:
    """Write config.json, the weights in ``dtype`` and (if given) the tokenizer into ``directory``.

    Weights beyond ``max_shard_size`` are split into shards with a
    ``model.safetensors.index.json`` (huggingface_hub's sharding).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = nemotron_nas_config(model.config, model.block_configs)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def parent_from_hf_state(config: LlamaConfig, state: dict[str, torch.Tensor]) -> HeteroLlamaForCausalLM:
    """The parent as our model, from a transformers Llama state dict."""
    model = HeteroLlamaForCausalLM(config, [parent_block_config(config)] * config.num_hidden_layers)
    model.load_state_dict(state, strict=True)
    return model.eval()
