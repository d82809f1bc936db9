"""The library pass's work (``hwopt.passes.library``): every variant of every layer, trained by BLD.

Blockwise local distillation (decoupled, as in the Puzzle paper): an
attention variant learns to reproduce the parent's attention output from
the parent's own input to that layer; an FFN variant learns the parent's
FFN output from the parent's hidden state after attention. The loss is the
normalised MSE ||y' - y||^2 / ||y||^2 of the sub-block's contribution to
the residual stream. Layers are visited in order with the parent's
activations carried from one to the next, so memory holds one parent
layer, the variant in training and one layer's activations at a time (the
parent is read a layer at a time, ``hwopt.model.layerwise``). Each trained
variant is saved on its own (``layer_<i>/<variant>.safetensors``); a rerun
skips the ones already saved. Under torchrun the (layer, variant) units are
dealt over the ranks.
The parent's own sub-blocks are not copied: the library refers to the parent.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hwopt.devices import FP32_CPU, Placement
from hwopt.distributed import ONE_PROCESS, Ranks
from hwopt.model.checkpoint import materialise
from hwopt.model.config import BlockConfig
from hwopt.model.layerwise import LayerwiseParent, whole_model
from hwopt.model.modeling import DecoderLayer, HeteroLlamaForCausalLM
from hwopt.pipeline import atomic_path, atomic_write_json
from hwopt.progress import progress
from hwopt.search_space import SearchSpace, SubVariant, sub_variant_from_json, sub_variant_of, sub_variants
from hwopt.settings import default

INDEX = "index.json"
Parent = HeteroLlamaForCausalLM | LayerwiseParent  # the whole model, or one read a layer at a time


@dataclass(frozen=True)
class BLDSettings:
    tokens: int = default("bld_tokens")  # training tokens per variant (one pass over them)
    batch_sequences: int = 8
    lr: float = default("bld_lr")
    seed: int = default("seed")


class SubBlock(nn.Module):
    """A sub-block with its own norm: the unit BLD trains (called as every sub-block is, without a cache)."""

    def __init__(self, kind: str, norm: nn.Module, module: nn.Module):
        super().__init__()
        self.kind, self.norm, self.module = kind, norm, module

    def forward(self, x, position_embeddings):
        return self.module(self.norm(x), position_embeddings, None, 0)


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def parent_sub_block(layer: DecoderLayer, kind: str) -> SubBlock:
    if kind == "attention":
        return SubBlock(kind, layer.input_layernorm, layer.self_attn)
    return SubBlock(kind, layer.post_attention_layernorm, layer.mlp)


def distil(block: nn.Module, forward, x: torch.Tensor, target: torch.Tensor, settings: BLDSettings,
           placement: Placement = FP32_CPU) -> dict:
    """Train ``block`` so that ``forward(x)`` reproduces ``target`` (normalised MSE, AdamW, cosine schedule, one
    pass over ``x`` [sequences, tokens, hidden] in batches); the last tenth of the sequences only measures the
    loss. ``block``'s weights and AdamW state stay fp32; its forwards run under ``placement.autocast()``.
    Returns the held-out loss before and after, and the tokens trained on."""
    n_val = max(1, len(x) // 10)
    train_x, val_x, train_y, val_y = x[:-n_val], x[-n_val:], target[:-n_val], target[-n_val:]

    def loss_on(xb, yb):
        with placement.autocast():
            return normalized_mse(forward(xb).float(), yb.float())

    with torch.no_grad():
        init_loss = loss_on(val_x, val_y).item()
    steps = max(1, math.ceil(len(train_x) / settings.batch_sequences))
    optimizer = torch.optim.AdamW(block.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in range(steps):
        rows = slice(step * settings.batch_sequences, (step + 1) * settings.batch_sequences)
        loss = loss_on(train_x[rows], train_y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        final_loss = loss_on(val_x, val_y).item()
    return {"init_nmse": init_loss, "final_nmse": final_loss, "train_tokens": train_x.shape[0] * train_x.shape[1]}


def train_variant(variant: SubVariant, parent: SubBlock, config, x: torch.Tensor, target: torch.Tensor,
                  position_embeddings, settings: BLDSettings, seed: int,
                  placement: Placement = FP32_CPU) -> tuple[SubBlock, dict]:
    """Initialise a variant (fp32, on ``placement``'s device) from the parent sub-block, then distil it on
    (x, target)."""
    torch.manual_seed(seed)
    with torch.device(placement.device):
        module = variant.block_type.build(variant.config, config)
        norm = type(parent.norm)(config.hidden_size, config.rms_norm_eps)
    norm.load_state_dict(parent.norm.state_dict())
    block = SubBlock(variant.kind, norm, module)
    with torch.no_grad():
        calib = parent.norm(x[:-max(1, len(x) // 10)][: settings.batch_sequences * 4])
        variant.block_type.init_from_parent(module, parent.module, calib, position_embeddings)
    return block, distil(block, lambda xb: block(xb, position_embeddings), x, target, settings, placement)


def variants_for_layer(config, block: BlockConfig, space: SearchSpace) -> dict[str, list[SubVariant]]:
    """The library's attention and FFN variants for a layer; the parent's own comes first."""
    out = {}
    for kind, own_cfg in (("attention", block.attention), ("ffn", block.ffn)):
        own = sub_variant_of(config, own_cfg)
        if own.block_type.num_params(own_cfg, config) == 0:  # a removed sub-block: nothing cheaper than nothing
            out[kind] = [own]
        else:
            out[kind] = [own] + [v for v in sub_variants(config, space, kind) if v.name != own.name]
    return out


def unit_path(layer_dir: Path, variant: SubVariant) -> Path:
    return layer_dir / f"{variant.kind}_{variant.name}.safetensors"


def is_trained(variant: SubVariant, config) -> bool:
    """Whether a variant has weights to train (a removed sub-block has none)."""
    return variant.block_type.num_params(variant.config, config) > 0


def train_unit(variant: SubVariant, seed: int, layer: DecoderLayer, config, activations: dict,
               position_embeddings, settings: BLDSettings, layer_dir: Path, placement: Placement) -> None:
    """Train one variant and save it (weights, then its BLD figures beside them), each file atomically."""
    path = unit_path(layer_dir, variant)
    x, target = activations[variant.kind]
    with torch.enable_grad():
        block, stats = train_variant(variant, parent_sub_block(layer, variant.kind), config, x, target,
                                     position_embeddings, settings, seed, placement)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}, tmp)
    atomic_write_json(path.with_suffix(".json"), stats)


def is_done(path: Path) -> bool:
    return path.is_file() and path.with_suffix(".json").is_file()


def library_entry(variant: SubVariant, config, layer_dir: Path) -> dict:
    """A variant's index entry, from its saved unit."""
    if not is_trained(variant, config):
        return {"config": variant.to_json(config), "weights": None}
    path = unit_path(layer_dir, variant)
    return {"config": variant.to_json(config), "weights": path.name,
            "bld": json.loads(path.with_suffix(".json").read_text())}


def build_library(parent: Parent, train_ids: torch.Tensor, space: SearchSpace, settings: BLDSettings,
                  out_dir: Path, placement: Placement = FP32_CPU, ranks: Ranks = ONE_PROCESS) -> None:
    """Train every non-parent variant of every layer into ``out_dir`` and write its index.

    ``parent``: the model, or a ``LayerwiseParent`` that reads one layer at a time. ``train_ids``: [sequences,
    tokens]. Under torchrun, (layer, variant) units are dealt round-robin over ``ranks``; each rank streams the
    parent's layers only as far as its last unit, and rank 0 writes the index once every rank is done.
    """
    out_dir = Path(out_dir)
    config = parent.config
    plan = [variants_for_layer(config, block, space) for block in parent.block_configs]
    units = [(i, n, variant) for i, layer_plan in enumerate(plan) for variants in layer_plan.values()
             for n, variant in enumerate(variants[1:], 1) if is_trained(variant, config)]
    mine = [(i, n, v) for k, (i, n, v) in enumerate(units)
            if ranks.owns(k) and not is_done(unit_path(out_dir / f"layer_{i}", v))]
    with progress("library (BLD)", total=len(mine)) as advance, torch.no_grad():
        x = parent.embedding()(train_ids.to(placement.device)) if mine else None
        position_embeddings = parent.position_embeddings(x, 0) if mine else None
        for i in range(max((i for i, _, _ in mine), default=-1) + 1):
            layer = parent.decoder_layer(i)
            if todo := [(n, v) for j, n, v in mine if j == i]:
                # each sub-block's input and the parent's contribution to the residual stream
                mid = x + layer.attention_delta(x, position_embeddings) if layer.self_attn else x
                ffn_out = layer.ffn_delta(mid, position_embeddings) if layer.mlp else torch.zeros_like(mid)
                activations = {"attention": (x, mid - x), "ffn": (mid, ffn_out)}
                for n, variant in todo:
                    train_unit(variant, settings.seed * 1_000_003 + i * 1000 + n, layer, config, activations,
                               position_embeddings, settings, out_dir / f"layer_{i}", placement)
                    advance()
            x = layer(x, position_embeddings)
    ranks.barrier()
    if ranks.is_main:
        index = {"parent_blocks": [b.to_json(parent.block_types, config) for b in parent.block_configs], "layers": {}}
        for i, layer_plan in enumerate(plan):
            index["layers"][f"layer_{i}"] = {kind: {
                own.name: {"config": own.to_json(config), "weights": "parent"},
                **{v.name: library_entry(v, config, out_dir / f"layer_{i}") for v in others}}
                for kind, (own, *others) in layer_plan.items()}
        atomic_write_json(out_dir / INDEX, index)
    ranks.barrier()


def coupled_subspace(solutions: list[list[tuple[str, str]]], parent_choice: list[tuple[str, str]]
                     ) -> dict[int, list[tuple[str, str]]]:
    """Coupled BLD's subspace (Puzzle, Sec. 4.1 and Table 6): per layer, the (attention, FFN) pairs that any of
    the decoupled search's ``solutions`` chose there, less the parent's own pair."""
    subspace = {}
    for i, own in enumerate(parent_choice):
        pairs = list(dict.fromkeys(tuple(solution[i]) for solution in solutions))
        if pairs := [p for p in pairs if p != tuple(own)]:
            subspace[i] = pairs
    return subspace


def build_coupled(parent: Parent, library: Library, subspace: dict[int, list[tuple[str, str]]],
                  train_ids: torch.Tensor, settings: BLDSettings, out_dir: Path,
                  placement: Placement = FP32_CPU, span: int = 1) -> None:
    """Coupled BLD: each (attention, FFN) pair of ``subspace`` trained as one layer, both sub-blocks together,
    to reproduce the parent layer's contribution to the residual stream from the parent's input to that layer
    (normalised MSE), starting from the decoupled variants; a pair whose loss on the held-out tenth rose keeps
    the decoupled weights (``"kept": false``). Writes ``out_dir/layer_<i>/<a>+<f>.safetensors``
    (a finished pair is kept on a rerun) and ``out_dir/index.json``; pairs with no weights are left out.

    ``span=2`` trains two-layer blocks: the pair at layer i learns the contribution of parent layers i and
    i + 1 together (their input to the output of i + 1), as one block that replaces both."""
    out_dir = Path(out_dir)
    index = {}
    what = "coupled BLD" if span == 1 else f"BLD of {span}-layer blocks"
    with progress(what, total=sum(map(len, subspace.values()))) as advance, torch.no_grad():
        x = parent.embedding()(train_ids.to(placement.device))
        position_embeddings = parent.position_embeddings(x, 0)
        for i in range(max(subspace, default=-1) + 1):
            parent_layer = parent.decoder_layer(i)
            next_x = parent_layer(x, position_embeddings)
            after = next_x
            for j in range(i + 1, i + span):  # the further parent layers a block spanning them replaces
                after = parent.decoder_layer(j)(after, position_embeddings)
            target = after - x
            for n, (a, f, layer) in enumerate(library.layers(i, subspace.get(i, []), parent_layer)):
                path = out_dir / f"layer_{i}" / f"{a}+{f}.safetensors"
                layer = copy.deepcopy(layer).float()  # never train the parent's own modules in place; fp32 masters
                if not any(True for _ in layer.parameters()):
                    advance()
                    continue
                if not is_done(path):
                    torch.manual_seed(settings.seed * 1_000_003 + i * 1000 + 500 + n)
                    before = copy.deepcopy(layer.state_dict())
                    with torch.enable_grad():
                        layer.requires_grad_(True)
                        stats = distil(layer, lambda xb, layer=layer: layer(xb, position_embeddings) - xb, x, target,
                                       settings, placement)
                    stats["kept"] = stats["final_nmse"] <= stats["init_nmse"]
                    if not stats["kept"]:  # worse on its held-out tenth: keep the decoupled variants as they were
                        layer.load_state_dict(before)
                    with atomic_path(path) as tmp:
                        save_file({k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}, tmp)
                    atomic_write_json(path.with_suffix(".json"), stats)
                index.setdefault(f"layer_{i}", {})[f"{a}+{f}"] = {
                    "weights": str(path.relative_to(out_dir)), "bld": json.loads(path.with_suffix(".json").read_text())}
                advance()
            x = next_x
    atomic_write_json(out_dir / INDEX, index)


class Library:
    """A built library: which variants each layer has, and their modules on demand.

    ``parent``: the model, or a ``LayerwiseParent``. Variants come onto ``placement``'s device in its dtype.
    With ``coupled_dir`` (written by ``build_coupled``), a pair trained by coupled BLD comes with those weights.
    """

    def __init__(self, library_dir: Path, parent: Parent, coupled_dir: Path | None = None,
                 placement: Placement = FP32_CPU):
        self.dir = Path(library_dir)
        self.parent = parent
        self.placement = placement
        self.index = json.loads((self.dir / INDEX).read_text())
        self.config = parent.config
        self.coupled_dir = Path(coupled_dir) if coupled_dir and (Path(coupled_dir) / INDEX).is_file() else None
        self.coupled = json.loads((self.coupled_dir / INDEX).read_text()) if self.coupled_dir else {}

    def variant_names(self, layer: int, kind: str) -> list[str]:
        return list(self.index["layers"][f"layer_{layer}"][kind])

    def sub_variant(self, layer: int, kind: str, name: str) -> SubVariant:
        entry = self.index["layers"][f"layer_{layer}"][kind][name]
        return sub_variant_from_json(kind, entry["config"], self.config, f"{self.dir / INDEX}: layer {layer}")

    def _weights(self, path: Path) -> dict[str, torch.Tensor]:
        return {k: v.to(self.placement.device, self.placement.dtype) for k, v in load_file(path).items()}

    def load(self, layer: int, kind: str, name: str, parent_layer: DecoderLayer
             ) -> tuple[nn.Module | None, nn.Module | None]:
        """(module, norm) of one variant of layer ``layer`` (whose parent's is ``parent_layer``): the parent's own,
        a trained one, or (None, None) for no-op."""
        entry = self.index["layers"][f"layer_{layer}"][kind][name]
        if entry["weights"] == "parent":
            block = parent_sub_block(parent_layer, kind)
            return block.module, block.norm
        if entry["weights"] is None:
            return None, None
        variant = self.sub_variant(layer, kind, name)
        with torch.device("meta"):
            block = SubBlock(kind, type(parent_sub_block(parent_layer, kind).norm)(self.config.hidden_size,
                                                                                 self.config.rms_norm_eps),
                             variant.block_type.build(variant.config, self.config))
        materialise(block, self._weights(self.dir / f"layer_{layer}" / entry["weights"]), f"{self.dir}: layer {layer}")
        return block.module, block.norm

    def layer(self, i: int, attention: str, ffn: str, parent_layer: DecoderLayer | None = None) -> DecoderLayer:
        """Layer ``i`` assembled from one attention and one FFN variant."""
        return next(self.layers(i, [(attention, ffn)], parent_layer))[2]

    def layers(self, i: int, pairs: list[tuple[str, str]], parent_layer: DecoderLayer | None = None
               ) -> Iterator[tuple[str, str, DecoderLayer]]:
        """Layer ``i`` assembled from each (attention, FFN) pair in turn; every variant is read from disk once.
        ``parent_layer``: the parent's layer ``i`` if the caller holds it (else it is read from the parent)."""
        parent_layer = parent_layer if parent_layer is not None else self.parent.decoder_layer(i)
        load = cache(partial(self.load, i, parent_layer=parent_layer))
        for attention, ffn in pairs:
            block = self.block_config(i, attention, ffn)
            coupled = self.coupled.get(f"layer_{i}", {}).get(f"{attention}+{ffn}")
            if coupled:
                with torch.device("meta"):
                    layer = DecoderLayer(self.config, block, self.parent.block_types)
                materialise(layer, self._weights(self.coupled_dir / coupled["weights"]),
                            f"{self.coupled_dir}: layer {i}")
                yield attention, ffn, layer
            else:
                yield attention, ffn, DecoderLayer.from_parts(block, *load("attention", attention), *load("ffn", ffn))

    def block_config(self, i: int, attention: str, ffn: str) -> BlockConfig:
        """Layer ``i``'s block of one attention and one FFN variant."""
        return BlockConfig(self.sub_variant(i, "attention", attention).config, self.sub_variant(i, "ffn", ffn).config)

    def assemble(self, choice: list[tuple[str, str]]) -> HeteroLlamaForCausalLM:
        """The child with the given (attention, ffn) variant names per layer, built a layer at a time on the
        library's device, fp32 (weights of its own: training it leaves the parent as it is); embeddings and head
        from the parent."""
        return Child(self, choice).whole()


class Child:
    """A child of a library before it is built: its architecture, and its weights read a piece at a time.

    ``choice``: the (attention, FFN) variant names per layer; ``layers``: layer index -> the library (read with
    coupled weights) whose pair stands at that layer instead of ``library``'s (two-layer blocks). It offers what
    ``hwopt.model.layerwise.pieces`` reads (``num_layers``, ``decoder_layer``, ``embedding``, ``output_head``,
    with ``config``, ``block_configs`` and ``block_types``), so it is built whole (``Library.assemble``) or
    sharded over ranks (``hwopt.uptraining.sharded_model``) without holding it whole first. Each layer is
    read from disk when asked for, on the library's device in its dtype; the embedding and head are the
    parent's.
    """

    def __init__(self, library: Library, choice: list[tuple[str, str]], layers: dict[int, Library] | None = None):
        self.library, self.choice, self.layers = library, [tuple(pair) for pair in choice], layers or {}
        self.config, self.block_types = library.config, library.parent.block_types
        self.block_configs = [library.block_config(i, a, f) for i, (a, f) in enumerate(self.choice)]

    @property
    def num_layers(self) -> int:
        return len(self.choice)

    def decoder_layer(self, i: int) -> DecoderLayer:
        return self.layers.get(i, self.library).layer(i, *self.choice[i])

    def embedding(self) -> nn.Embedding:
        return self.library.parent.embedding()

    def output_head(self) -> tuple[nn.Module, nn.Linear]:
        return self.library.parent.output_head()

    def whole(self) -> HeteroLlamaForCausalLM:
        """The child built whole on the library's device, fp32 (weights of its own: training it leaves the parent
        and the library as they are)."""
        return whole_model(self, self.library.placement.device, torch.float32, str(self.library.dir))
