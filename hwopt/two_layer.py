"""Two-layer blocks: one (attention, FFN) block that replaces two consecutive parent layers.

The Puzzle paper's search space (arXiv 2411.19146, Sec. 3) lets a child
block stand in for more than one parent layer. Here a block at layer i may
replace parent layers i and i + 1: in the child it sits at layer i and layer
i + 1 is a no-op (no attention, no FFN), so the child is still a plain
``nemotron-nas`` checkpoint with the parent's number of layers.

- library (``build_two_layer``): for every layer but the last, the parent's
  own (attention, FFN) pair and the largest cheaper pair of the same block
  types (``two_layer_subspace``) are trained by BLD to reproduce parent
  layers i and i + 1 together: from the parent's hidden state entering layer
  i to the one leaving layer i + 1 (``build_coupled`` with ``span=2``),
  starting from the one-layer library's weights.
- score (``add_two_layer_entries``): replace-2-blocks, the parent with layers
  i and i + 1 replaced by the block and a no-op, against the parent. Layer i
  gets the entry ``2L:<attention>+<ffn>`` with ``"span": 2`` and the block's
  costs (its variants' costs, as a one-layer block has); layer i + 1 gets one
  ``spanned`` entry (``"spanned": true``) with the no-op layer's costs and
  the parent's own metrics there, so that summed metrics count each parent
  layer once. The solve pass reads the pair as a set-partition constraint
  (``hwopt.problem.Link``).
- uptrain and lower (``assemble_child``): the child with the two-layer weights at
  the layers ``solutions.json`` lists under ``"spans"``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from hwopt.bld import BLDSettings, Child, Library, Parent, build_coupled
from hwopt.devices import FP32_CPU, Placement
from hwopt.errors import HwoptError
from hwopt.metric import Metric
from hwopt.model.config import BlockConfig
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.progress import progress
from hwopt.scoring import outputs_of, swapped_final_hidden, swapped_logits
from hwopt.search_space import block_variant_name
from hwopt.tasks import MultipleChoice

SPAN = 2
SPANNED = "spanned"  # the entry a two-layer block leaves in the layer after it


def two_layer_name(attention: str, ffn: str) -> str:
    """A two-layer block's name in the block library, e.g. ``2L:kv1+ffn1152``."""
    return f"{SPAN}L:{block_variant_name(attention, ffn)}"


def _largest_cheaper(library: Library, i: int, kind: str) -> str:
    """The variant of the parent's own block type with the most parameters below the parent's own, or the
    parent's own when there is none."""
    own, *others = library.variant_names(i, kind)
    own_variant = library.sub_variant(i, kind, own)
    params = {name: (v := library.sub_variant(i, kind, name)).block_type.num_params(v.config, library.config)
              for name in others if library.sub_variant(i, kind, name).block_type is own_variant.block_type}
    own_params = own_variant.block_type.num_params(own_variant.config, library.config)
    cheaper = [name for name, n in params.items() if 0 < n < own_params]
    return max(cheaper, key=params.get) if cheaper else own


def two_layer_subspace(library: Library, num_layers: int) -> dict[int, list[tuple[str, str]]]:
    """Per layer but the last, the (attention, FFN) pairs offered as two-layer blocks: the parent's own pair and
    the largest cheaper one (``_largest_cheaper``); pairs without weights (both halves removed) are left out,
    as removing both layers is already a choice of one-layer no-ops."""
    subspace = {}
    for i in range(num_layers - 1):
        own = (library.variant_names(i, "attention")[0], library.variant_names(i, "ffn")[0])
        cheaper = (_largest_cheaper(library, i, "attention"), _largest_cheaper(library, i, "ffn"))
        pairs = [p for p in dict.fromkeys([own, cheaper]) if _trainable(library, i, p)]
        if pairs:
            subspace[i] = pairs
    return subspace


def _trainable(library: Library, i: int, pair: tuple[str, str]) -> bool:
    return any(library.sub_variant(i, kind, name).block_type.num_params(library.sub_variant(i, kind, name).config,
                                                                        library.config) > 0
               for kind, name in zip(("attention", "ffn"), pair))


def noop_pair(library: Library, i: int) -> tuple[str, str]:
    """The names of layer ``i``'s no-op attention and FFN variants.

    Raises:
        HwoptError: the library offers none (built with ``--no-noop``), so no block can span into layer ``i``.
    """
    names = []
    for kind in ("attention", "ffn"):
        found = [n for n in library.variant_names(i, kind) if getattr(library.sub_variant(i, kind, n).config,
                                                                      "no_op", False)]
        if not found:
            raise HwoptError(f"{library.dir}: layer {i} offers no no-op {kind}, which a two-layer block leaves in "
                             "the layer after it: build the library without --no-noop")
        names.append(found[0])
    return names[0], names[1]


def build_two_layer(parent: Parent, library: Library, train_ids: torch.Tensor, settings: BLDSettings,
                    out_dir: Path, placement: Placement = FP32_CPU) -> None:
    """BLD of every offered two-layer block (``two_layer_subspace``) into ``out_dir`` (``index.json`` and
    ``layer_<i>/<a>+<f>.safetensors``, read back with ``Library(..., coupled_dir=out_dir)``). ``parent``: the
    model, or a ``LayerwiseParent``."""
    for i in range(1, parent.num_layers):
        noop_pair(library, i)  # fail before training anything
    build_coupled(parent, library, two_layer_subspace(library, parent.num_layers), train_ids, settings, out_dir,
                  placement, span=SPAN)


@torch.inference_mode()
def add_two_layer_entries(parent: Parent, two_layer: Library, block_library: dict,
                          heldout_ids: torch.Tensor, metrics: list[Metric],
                          task: MultipleChoice | None = None) -> dict:
    """``block_library`` with each trained two-layer block scored by replace-2-blocks, and a ``spanned`` entry in
    every layer a block can span into (see the module docstring); the new entries without costs, as
    ``score_metrics`` writes them (``with_costs`` joins them).

    ``two_layer``: the library read with the two-layer weights (``Library(..., coupled_dir=<build_two_layer's
    out_dir>)``); blocks ``build_two_layer`` trained nothing for are left out. ``heldout_ids``: [sequences,
    tokens].
    """
    trained = {int(layer.removeprefix("layer_")): [tuple(name.split("+", 1)) for name in pairs]
               for layer, pairs in two_layer.coupled.items()}
    head = parent.output_head()
    teacher = outputs_of(swapped_final_hidden(parent, heldout_ids), head, heldout_ids, partial(swapped_logits, parent),
                         task)
    out = {layer: dict(entries) for layer, entries in block_library.items()}
    with progress("score (replace-2-blocks)", total=sum(map(len, trained.values()))) as advance:
        for i, pairs in sorted(trained.items()):
            for a, f, layer in two_layer.layers(i, pairs):
                swap = (i, layer)
                student = outputs_of(swapped_final_hidden(parent, heldout_ids, swap, SPAN), head, heldout_ids,
                                     partial(swapped_logits, parent, swap=swap, span=SPAN), task)
                out[f"layer_{i}"][two_layer_name(a, f)] = {
                    "metrics": {m.name: m.compute(student, teacher) for m in metrics},
                    "scored": "replace-2-blocks",
                    "attention": a,
                    "ffn": f,
                    "parent": False,
                    "span": SPAN,
                    "block_config": layer.block.to_json(parent.block_types, parent.config),
                }
                advance()
            following = f"layer_{i + 1}"
            noop_a, noop_f = noop_pair(two_layer, i + 1)
            out[following][SPANNED] = {
                "metrics": next(e["metrics"] for e in out[following].values() if e.get("parent")),
                "scored": "spanned",
                "attention": noop_a,
                "ffn": noop_f,
                "parent": False,
                "spanned": True,
                "block_config": BlockConfig(two_layer.sub_variant(i + 1, "attention", noop_a).config,
                                            two_layer.sub_variant(i + 1, "ffn", noop_f).config
                                            ).to_json(parent.block_types, parent.config),
            }
    return out


def child_of(library: Library, two_layer: Library, choice: list[tuple[str, str]], spans: list[int]) -> Child:
    """The child of ``choice`` ((attention, FFN) names per layer, as ``Library.assemble`` takes it) whose layers
    ``spans`` hold two-layer blocks (``two_layer``'s weights), read a piece at a time (``Child``); the layer
    after each span must be a no-op.

    Raises:
        HwoptError: a span at the last layer, a layer after a span that is not a no-op, or a two-layer block that
            was not trained.
    """
    for i in spans:
        if i + 1 >= len(choice) or tuple(choice[i + 1]) != noop_pair(library, i + 1):
            raise HwoptError(f"layer {i} holds a two-layer block, so layer {i + 1} must be a no-op, not "
                             f"{choice[i + 1] if i + 1 < len(choice) else 'missing'}")
        name = block_variant_name(*choice[i])
        if name not in two_layer.coupled.get(f"layer_{i}", {}):
            raise HwoptError(f"{two_layer.coupled_dir}: no two-layer block {name} was trained at layer {i}")
    return Child(library, choice, dict.fromkeys(spans, two_layer))


def assemble_child(library: Library, two_layer: Library, choice: list[tuple[str, str]],
                   spans: list[int]) -> HeteroLlamaForCausalLM:
    """``child_of``'s child built whole, fp32, on ``library``'s device. Raises HwoptError as ``child_of``."""
    return child_of(library, two_layer, choice, spans).whole()
