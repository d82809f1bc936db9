"""Loading the weights of Llama and nemotron-nas checkpoints, and writing nemotron-nas ones.

The architecture comes from ``hwopt.model.architecture``. Weights follow
``model.safetensors.index.json`` where there is one, as transformers does.
Writers keep both the transformers 5 rope fields and the older
``rope_theta``/``rope_scaling`` that vLLM, TensorRT-LLM and llama.cpp read,
and store ``intermediate_size`` next to ``ffn_mult``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError, safe_open
from transformers import LlamaConfig

from hwopt.errors import HwoptError
from hwopt.model.architecture import nemotron_nas_config, read_architecture
from hwopt.model.config import parent_block_config
from hwopt.model.modeling import HeteroLlamaForCausalLM

INDEX_FILE = "model.safetensors.index.json"


def tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise HwoptError(f"{file} is not a readable safetensors file: {exc}") from None


def weight_files(directory: Path) -> dict[str, Path]:
    """Which file holds each tensor of a checkpoint directory.

    With ``model.safetensors.index.json``, only the files its ``weight_map``
    names are read (a left-over ``model.safetensors`` beside them is ignored,
    with a warning); without one, every ``*.safetensors`` file.

    Raises:
        HwoptError: no weights; an index that is not JSON, has no ``weight_map``, names a missing file,
            or places a tensor in a file that lacks it; a tensor name found in two files.
    """
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    weight_map = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HwoptError(f"{index_path} is not a safetensors index (JSON with a weight_map): {exc}") from None
        files = sorted({directory / name for name in weight_map.values()})
        for missing in (f for f in files if not f.is_file()):
            raise HwoptError(f"{index_path} names {missing.name}, which is not in {directory}")
        for stale in sorted(set(directory.glob("*.safetensors")) - set(files)):
            warnings.warn(f"{stale} is not in {INDEX_FILE}; it is ignored", stacklevel=2)
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise HwoptError(f"{directory} has no *.safetensors weights")
    where: dict[str, Path] = {}
    for file in files:
        for name in tensor_names(file):
            if name in where:
                raise HwoptError(f"tensor {name} is in both {where[name]} and {file}: which one is meant is unclear")
            where[name] = file
    for name, file_name in (weight_map or {}).items():
        if where.get(name) != directory / file_name:
            raise HwoptError(f"{index_path} places {name} in {file_name}, but that file does not hold it")
    return where


def load_weights(model: HeteroLlamaForCausalLM, directory: Path) -> None:
    """Load a checkpoint's weights into the model, strictly (see ``weight_files`` for which files)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_files(directory).items():
        by_file.setdefault(file, []).append(name)
    state = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            state.update({name: f.get_tensor(name) for name in names})
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HwoptError(f"weights in {directory} do not fit the architecture: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_checkpoint(directory: Path, block_types) -> HeteroLlamaForCausalLM:
    """A Llama or nemotron-nas checkpoint as our model; ``block_types`` read and build its sub-blocks."""
    config, blocks = read_architecture(directory, block_types)
    model = HeteroLlamaForCausalLM(config.transformers(), blocks, block_types)
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
    config = nemotron_nas_config(model.config, model.block_configs, model.block_types)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def parent_from_hf_state(config: LlamaConfig, state: dict[str, torch.Tensor], block_types) -> HeteroLlamaForCausalLM:
    """The parent as our model, from a transformers Llama state dict."""
    model = HeteroLlamaForCausalLM(config, [parent_block_config(config)] * config.num_hidden_layers, block_types)
    model.load_state_dict(state, strict=True)
    return model.eval()
