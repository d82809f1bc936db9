"""Model sources: a ``--model`` by name or path, where a parent's architecture and weights come from.

Not the model code (``hwopt.model``: architecture, configs, modeling,
checkpoints) nor the built-in names (``hwopt.builtin.model_names``).

A name (``smollm2-135m``, ``llama-3.1-70b``, or one a plugin registers)
gives an architecture without weights; weights are found on disk when
needed. A path gives a Hugging Face Llama directory (the parent) or a
nemotron-nas directory (a child).

An architecture is a ``ModelConfig``, read without transformers or torch
(``hwopt estimate`` needs neither); transformers' ``LlamaConfig`` is made
on first use of ``ModelSource.config``, where a torch model is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.model.architecture import ModelConfig, read_architecture
from hwopt.model.config import BlockConfig, parent_block_config
from hwopt.plugins import block_types, models

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from hwopt.model.modeling import HeteroLlamaForCausalLM


@dataclass(frozen=True)
class ModelSpec:
    """A model name: its architecture, and how to find its weights."""

    name: str
    description: str
    make_config: Callable[[], ModelConfig]
    find_weights: Callable[[], Path | None]  # a Hugging Face directory with weights, or None
    weights_hint: str  # where find_weights looks, for the error message
    aliases: tuple[str, ...] = ()


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot of a repo in the Hugging Face cache that has weights."""
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    snapshots = Path(hub) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    with_weights = [d for d in snapshots.glob("*") if any(d.glob("*.safetensors"))]
    return max(with_weights, key=lambda d: d.stat().st_mtime) if with_weights else None


@dataclass
class ModelSource:
    """A resolved ``--model``: architecture now, weights on demand."""

    label: str
    architecture: ModelConfig
    block_configs: list[BlockConfig]
    weights_dir: Path | None
    weights_hint: str
    find_weights: Callable[[], Path | None] | None = None

    @cached_property
    def config(self) -> LlamaConfig:
        """transformers' config of the architecture, to build torch models with (imports transformers)."""
        return self.architecture.transformers()

    def require_weights(self) -> Path:
        if self.weights_dir is None and self.find_weights is not None:
            self.weights_dir = self.find_weights()
        if self.weights_dir is None:
            raise HwoptError(f"no weights for {self.label}: {self.weights_hint}")
        return self.weights_dir

    def load(self, device="cpu", dtype=None) -> HeteroLlamaForCausalLM:
        """The whole model on ``device`` (a ``torch.device`` or its name) in ``dtype`` (None: fp32)."""
        import torch

        from hwopt.lowering import transformers_code  # noqa: F401  (registers nemotron-nas with the Auto classes)
        from hwopt.model.checkpoint import load_checkpoint

        return load_checkpoint(self.require_weights(), block_types(), device, dtype or torch.float32)

    def tokenizer(self):
        from transformers import AutoTokenizer

        directory = self.require_weights()
        try:
            return AutoTokenizer.from_pretrained(directory)
        except Exception as exc:  # transformers raises many kinds here; the user needs to know which file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HwoptError(f"cannot load a tokenizer from {directory}: {reason}") from None


def resolve_model(name_or_path: str) -> ModelSource:
    """A model name (built in or a plugin's) or a checkpoint directory or config.json.

    A config.json's ``block_configs`` are read by every installed block type.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):  # a checkpoint, or just its config.json
        config, blocks = read_architecture(path, block_types())
        directory = path if path.is_dir() else path.parent
        weights = directory if any(directory.glob("*.safetensors")) else None
        return ModelSource(str(path), config, blocks, weights, f"{directory} holds no *.safetensors")
    for spec in models():
        if name_or_path.lower() in (spec.name, *spec.aliases):
            config = spec.make_config()
            blocks = [parent_block_config(config)] * config.num_hidden_layers
            return ModelSource(spec.name, config, blocks, None, spec.weights_hint, spec.find_weights)
    known = ", ".join(sorted(s.name for s in models()))
    raise HwoptError(f"unknown model {name_or_path!r}: not a directory or config.json, nor a known name ({known})")


def load_model(name_or_path: str) -> HeteroLlamaForCausalLM:
    """A parent by name, or a Llama / nemotron-nas checkpoint by path, ready for inference."""
    return resolve_model(name_or_path).load()
