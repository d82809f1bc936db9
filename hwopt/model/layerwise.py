"""A parent read from its checkpoint one piece at a time, never whole in memory.

library and score visit the parent's layers in order, so they need only
one of them at a time: ``LayerwiseParent`` builds each piece on the meta
device and reads its tensors through the safetensors index (memory-mapped,
sharded checkpoints included) onto the pass's device, in its dtype, when
asked; the caller drops it when done. It offers what
``HeteroLlamaForCausalLM`` offers for this (``num_layers``,
``decoder_layer``, ``embedding``, ``output_head``, ``position_embeddings``),
so a pass takes either.

``pieces`` reads any such source (the library's children too) a piece at a
time, keyed as in the whole model's state dict: ``whole_model`` builds it
whole from them, ``hwopt.uptraining.sharded_model`` gives each rank of an
FSDP job its shards of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from hwopt.model.architecture import read_architecture
from hwopt.model.checkpoint import load_checkpoint, materialise, materialise_model, read_tensors, weight_files
from hwopt.model.modeling import DecoderLayer, HeteroLlamaForCausalLM, rotary_tables


class LayerwiseParent:
    """The parent in ``directory`` (Llama or nemotron-nas), each piece read on demand onto ``device`` in
    ``dtype``. Raises HwoptError (from ``weight_files``) for a checkpoint whose files or index are broken."""

    def __init__(self, directory: Path, block_types, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.directory = Path(directory)
        architecture, self.block_configs = read_architecture(self.directory, block_types)
        self.config = architecture.transformers()  # transformers' LlamaConfig, which the torch modules are built from
        self.block_types = block_types
        self.device, self.dtype = torch.device(device), dtype
        self.where = weight_files(self.directory)
        with torch.device(self.device):
            self.rotary_emb = LlamaRotaryEmbedding(self.config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def _read(self, module: nn.Module, prefix: str, names: dict[str, str] | None = None) -> nn.Module:
        """``module`` (on meta) given the checkpoint tensors under ``prefix`` (``names``: own name -> stored)."""
        names = names or {name.removeprefix(prefix): name for name in self.where if name.startswith(prefix)}
        stored = read_tensors(self.where, list(names.values()), self.device, self.dtype)
        materialise(module, {own: stored[name] for own, name in names.items()}, f"{self.directory} ({prefix}*)")
        return module.eval().requires_grad_(False)

    def decoder_layer(self, i: int) -> DecoderLayer:
        """Layer ``i``, read from disk now."""
        with torch.device("meta"):
            layer = DecoderLayer(self.config, self.block_configs[i], self.block_types)
        return self._read(layer, f"model.layers.{i}.")

    def embedding(self) -> nn.Embedding:
        with torch.device("meta"):
            embed = nn.Embedding(self.config.vocab_size, self.config.hidden_size)
        return self._read(embed, "", {"weight": "model.embed_tokens.weight"})

    def output_head(self) -> tuple[nn.Module, nn.Linear]:
        """The final norm and the LM head (the embedding's matrix when the two are tied)."""
        with torch.device("meta"):
            norm = LlamaRMSNorm(self.config.hidden_size, self.config.rms_norm_eps)
            head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        tied = self.config.tie_word_embeddings or "lm_head.weight" not in self.where
        head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        return self._read(norm, "", {"weight": "model.norm.weight"}), self._read(head, "", {"weight": head_name})

    def position_embeddings(self, x: torch.Tensor, start: int):
        return rotary_tables(self.rotary_emb, x, start)

    def pieces(self) -> Iterator[dict[str, torch.Tensor]]:
        """Its weights a piece at a time (``pieces``), each read from disk when asked for."""
        return pieces(self)

    def whole(self) -> HeteroLlamaForCausalLM:
        """The whole parent in memory (for passes that run it end to end: uptrain's teacher, the report)."""
        return load_checkpoint(self.directory, self.block_types, self.device, self.dtype)


def pieces(source) -> Iterator[dict[str, torch.Tensor]]:
    """``source``'s weights a piece at a time, keyed as in the whole model's state dict: each decoder layer
    (``model.layers.<i>.*``), then the embedding, then the final norm and the LM head (``lm_head.weight`` is the
    embedding's matrix when the two are tied). ``source``: anything that offers ``num_layers``, ``decoder_layer``,
    ``embedding`` and ``output_head`` (a ``HeteroLlamaForCausalLM``, a ``LayerwiseParent``, a library's
    ``Child``); a ``LayerwiseParent`` reads each piece from disk when it is asked for, so a caller that drops
    each piece before asking for the next holds one at a time."""
    for i in range(source.num_layers):
        yield {f"model.layers.{i}.{name}": t for name, t in source.decoder_layer(i).state_dict().items()}
    yield {"model.embed_tokens.weight": source.embedding().weight}
    norm, head = source.output_head()
    yield {"model.norm.weight": norm.weight, "lm_head.weight": head.weight}


def whole_model(source, device: torch.device | str, dtype: torch.dtype, what: str) -> HeteroLlamaForCausalLM:
    """``source`` (see ``pieces``, which also offers ``config``, ``block_configs`` and ``block_types``) as one
    model on ``device`` in ``dtype``: built on the meta device, then given copies of its pieces (weights of its
    own: training it leaves the source as it is). Raises HwoptError naming ``what`` when the weights do not fit
    the architecture."""
    state = {}
    for piece in pieces(source):
        state.update({name: t.detach().to(device, dtype, copy=True) for name, t in piece.items()})
    if source.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = HeteroLlamaForCausalLM(source.config, source.block_configs, source.block_types)
    materialise_model(model, state, what, device)
    return model.eval()
