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
from huggingface_hub import save_torch_state_dict, split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

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


def read_tensors(where: dict[str, Path], names: list[str], device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (``where`` says which file holds each, see ``weight_files``), read through
    ``safe_open`` (memory-mapped: only these tensors' bytes are read) onto ``device`` in ``dtype`` (None: as
    stored). Each file is closed again before returning, so its pages leave this process."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    state = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in file_names:
                tensor = f.get_tensor(name)
                state[name] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
    return state


def materialise(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Give ``module`` (built on the meta device, or anywhere) the tensors of ``state`` as its own, strictly.

    ``assign=True`` makes the loaded tensors the parameters, so nothing is allocated twice and no random
    initialisation happens. Raises HwoptError naming ``what`` (the checkpoint and the layer) when the names
    do not fit.
    """
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise HwoptError(f"weights in {what} do not fit the architecture: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_weights(model: HeteroLlamaForCausalLM, directory: Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = torch.float32) -> None:
    """Load a checkpoint's weights into the model (built on the meta device or anywhere), strictly, onto
    ``device`` in ``dtype`` (see ``weight_files`` for which files)."""
    where = weight_files(directory)
    state = read_tensors(where, list(where), device, dtype)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    materialise_model(model, state, str(directory), device)


def materialise_model(model: HeteroLlamaForCausalLM, state: dict[str, torch.Tensor], what: str,
                      device: torch.device | str) -> None:
    """``materialise`` a whole model built on the meta device: its weights tied again where the config ties
    them, and its rotary tables (computed, not stored) built on ``device``."""
    materialise(model, state, what)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rebuild_rotary(model, device)


def rebuild_rotary(model: HeteroLlamaForCausalLM, device: torch.device | str) -> None:
    """The rotary tables of a model built on the meta device, computed on ``device`` (a state dict has none)."""
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(model.config)


def load_checkpoint(directory: Path, block_types, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = torch.float32) -> HeteroLlamaForCausalLM:
    """A Llama or nemotron-nas checkpoint as our model; ``block_types`` read and build its sub-blocks.

    The model is built on the meta device and its weights are read straight onto ``device`` in ``dtype``
    (None: the checkpoint's own): no host copy in another dtype first, no random initialisation.
    """
    config, blocks = read_architecture(directory, block_types)
    with torch.device("meta"):
        model = HeteroLlamaForCausalLM(config.transformers(), blocks, block_types)
    load_weights(model, directory, device, dtype)
    return model.eval()


def save_nemotron_nas(model, directory: Path, tokenizer=None, dtype: torch.dtype = torch.float32,
                      max_shard_size: int | str = "5GB", state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json, the weights in ``dtype`` and (if given) the tokenizer into ``directory``.

    Weights beyond ``max_shard_size`` are split into shards with a
    ``model.safetensors.index.json`` (huggingface_hub's sharding). ``model``: a
    ``HeteroLlamaForCausalLM``, or a checkpoint read a piece at a time
    (``hwopt.model.layerwise.LayerwiseParent``), whose weights are then written
    shard by shard as they are read, never whole (``write_pieces``). ``state``:
    the weights to write when the model does not hold them whole (one sharded
    by FSDP: ``hwopt.uptraining.full_weights``); default its own state dict.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = nemotron_nas_config(model.config, model.block_configs, model.block_types)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if state is None and not isinstance(model, nn.Module):
        write_pieces(model.pieces(), weight_layout(model), directory, dtype, max_shard_size)
    else:
        state = {k: v.detach().to(dtype) for k, v in (model.state_dict() if state is None else state).items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_torch_state_dict(state, directory, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def meta_model(source) -> HeteroLlamaForCausalLM:
    """``source``'s architecture (``config``, ``block_configs``, ``block_types``) built on the meta device: its
    parameters' names, shapes and count without reading or holding a weight."""
    with torch.device("meta"):
        return HeteroLlamaForCausalLM(source.config, source.block_configs, source.block_types)


def weight_layout(source) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint of ``source``'s architecture stores (``config``, ``block_configs``,
    ``block_types``), on the meta device, in the whole model's state-dict order (so its shards are those of the
    whole model's), the LM head left out when tied to the embedding."""
    state = meta_model(source).state_dict()
    if source.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_pieces(pieces, layout: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype,
                 max_shard_size: int | str) -> None:
    """Weights arriving a piece at a time (dicts of name -> tensor), written in ``dtype`` as the safetensors files
    (and index) huggingface_hub's ``save_torch_state_dict`` would write for them whole: the shards are planned on
    ``layout`` (``weight_layout``) by its ``split_torch_state_dict_into_shards``, and each is written once its
    last tensor has arrived: the first shard (which holds the embedding, read last) and the one being filled are
    held, two shards at most. Tensors not in ``layout`` are skipped (a tied LM head)."""
    split = split_torch_state_dict_into_shards({k: t.to(dtype) for k, t in layout.items()},
                                               max_shard_size=max_shard_size)
    missing = {file: set(names) for file, names in split.filename_to_tensors.items()}
    open_shards: dict[str, dict[str, torch.Tensor]] = {}
    for piece in pieces:
        for name, tensor in piece.items():
            if (file := split.tensor_to_filename.get(name)) is None:
                continue
            open_shards.setdefault(file, {})[name] = tensor.detach().to("cpu", dtype).contiguous()
            missing[file].discard(name)
            if not missing[file]:
                save_file(open_shards.pop(file), directory / file, metadata={"format": "pt"})
    if unwritten := sorted(file for file, names in missing.items() if names):
        raise HwoptError(f"{directory}: the pieces did not bring every weight of {', '.join(unwritten)}")
    if split.is_sharded:
        index = {"metadata": {"format": "pt", **split.metadata}, "weight_map": split.tensor_to_filename}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def parent_from_hf_state(config: LlamaConfig, state: dict[str, torch.Tensor], block_types) -> HeteroLlamaForCausalLM:
    """The parent as our model, from a transformers Llama state dict."""
    model = HeteroLlamaForCausalLM(config, [parent_block_config(config)] * config.num_hidden_layers, block_types)
    model.load_state_dict(state, strict=True)
    return model.eval()
