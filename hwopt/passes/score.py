"""score: replace-1-block scoring, joined with costs into the block library.

For every layer i and every (attention, FFN) pair the library offers there,
the parent runs with exactly that one block swapped in, on held-out tokens,
and each metric compares its output with the parent's (KL divergence by
default; a task metric also runs the swapped model on the user's questions).
The parent's activations at every layer are computed once per input, so a
swapped forward starts at layer i rather than at the embeddings; each
layer's variants are loaded from disk once, not once per partner; the
parent's own block is the teacher itself and is not run again.

``pairs="coupled"`` runs every pair (|A| x |F| forwards per layer).
``pairs="decoupled"`` (the default) runs each attention variant beside the
parent's FFN and each FFN variant beside the parent's attention
(|A| + |F| - 1 forwards per layer; SmolLM2: 9 instead of 24) and estimates
the other pairs to first order: m(a, f) = m(a, F0) + m(A0, f) - m(A0, F0),
with A0, F0 the parent's own. This is the decoupled approximation the
Puzzle paper makes in decoupled BLD (Sec. 4.1), applied to scoring; each
entry says which it got (``"scored": "replace-1-block" | "decoupled"``).
The result
is ``block_library.json`` in the format of NVIDIA's Puzzle demo library:
per layer and variant, ``stats`` (costs from the profile) and ``metrics``.
Each finished layer is saved on its own; a rerun picks up from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from hwopt.errors import HwoptError
from hwopt.metric import Metric, Outputs
from hwopt.model.modeling import DecoderLayer, HeteroLlamaForCausalLM
from hwopt.passes.library import Library
from hwopt.pipeline import atomic_write_json
from hwopt.progress import progress
from hwopt.search_space import block_variant_name
from hwopt.tasks import MultipleChoice

COST_KEYS = ("runtime_ms", "prefill_ms", "decode_ms", "ttft_ms", "memory_mib", "weights_mib", "kv_cache_mib",
             "num_params")


def block_stats(costs: dict, attention: str, ffn: str) -> dict:
    """A block's costs: its attention's plus its FFN's, with where the figures came from."""
    a, f = costs["attention"][attention], costs["ffn"][ffn]
    stats = {key: a[key] + f[key] for key in COST_KEYS}
    stats["source"] = costs["source"]["summary"]
    return stats


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels for every position, -100 where the next token is not known."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.flatten()


class ParentActivations:
    """The parent's hidden state entering every layer, per input, computed once.

    A replace-1-block forward for layer i starts from these at layer i rather
    than at the embeddings. Memory: (layers + 1) x tokens x hidden floats per
    input: for SmolLM2 (30 layers, hidden 576) in fp32, 36 MB for 512
    held-out tokens, and as much again per 512 tokens of task rows.
    """

    def __init__(self, parent: HeteroLlamaForCausalLM):
        self.parent = parent
        self._cache = {}

    def at_layers(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The embeddings, then the output of every layer, on ``ids``."""
        key = (tuple(ids.shape), ids.cpu().numpy().tobytes())
        if key not in self._cache:
            self._cache[key] = self.parent(ids, output_hidden_states=True).hidden_states
        return self._cache[key]

    def final_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The parent's last hidden states, after the final norm."""
        return self.parent.model.norm(self.at_layers(ids)[-1])

    def swapped_final_hidden(self, ids: torch.Tensor, i: int, layer: DecoderLayer, span: int = 1) -> torch.Tensor:
        """The last hidden states, after the final norm, of the parent with its ``span`` layers from ``i`` on
        replaced by ``layer`` (``span=2``: a two-layer block, the layer after it a no-op)."""
        hidden = self.at_layers(ids)
        position_embeddings = self.parent.position_embeddings(hidden[i], 0)
        x = self.parent.run_layers(layer(hidden[i], position_embeddings), position_embeddings, start=i + span)
        return self.parent.model.norm(x)


def outputs_of(final_hidden: Callable[[torch.Tensor], torch.Tensor], lm_head: torch.nn.Module, ids: torch.Tensor,
               task: MultipleChoice | None) -> Outputs:
    """What a metric sees of a model given as its final hidden states on token ids."""
    hidden = final_hidden(ids)
    return Outputs(logits=lm_head(hidden).flatten(0, 1), hidden=hidden.flatten(0, 1), labels=next_token_labels(ids),
                   model=lambda x: lm_head(final_hidden(x)), task=task)


SCORE_PAIRS = ("decoupled", "coupled")


def pairs_to_run(attention_names: list[str], ffn_names: list[str], pairs: str) -> list[tuple[str, str]]:
    """The (attention, FFN) pairs whose replace-1-block forward is run; the parent's own names come first."""
    if pairs == "coupled":
        return [(a, f) for a in attention_names for f in ffn_names]
    if pairs == "decoupled":
        return [(a, ffn_names[0]) for a in attention_names] + [(attention_names[0], f) for f in ffn_names[1:]]
    raise HwoptError(f"unknown scoring of pairs {pairs!r}: choose {' or '.join(SCORE_PAIRS)}")


def decoupled_estimate(measured: dict[tuple[str, str], dict[str, float]], attention: str, ffn: str,
                       own: tuple[str, str]) -> dict[str, float]:
    """m(a, f) ~ m(a, F0) + m(A0, f) - m(A0, F0), per metric (first order in each sub-block's change)."""
    a_part, f_part, base = measured[(attention, own[1])], measured[(own[0], ffn)], measured[own]
    return {name: a_part[name] + f_part[name] - base[name] for name in base}


def score_layer(parent: HeteroLlamaForCausalLM, library: Library, i: int, activations: ParentActivations,
                teacher: Outputs, heldout_ids: torch.Tensor, metrics: list[Metric], costs: dict,
                run: list[tuple[str, str]], pairs: list[tuple[str, str]], task: MultipleChoice | None = None,
                advance: Callable[[], None] = lambda: None) -> dict:
    """Block-library entries of layer ``i`` for ``pairs``: replace-1-block for those in ``run``, the others
    estimated (``decoupled_estimate``, from pairs in ``run``). The parent's own pair is the teacher itself."""
    attention_names, ffn_names = library.variant_names(i, "attention"), library.variant_names(i, "ffn")
    own = (attention_names[0], ffn_names[0])
    measured, blocks = {}, {}
    for a, f, layer in library.layers(i, pairs):
        blocks[(a, f)] = layer.block
        if (a, f) not in run:
            continue
        student = teacher if (a, f) == own else outputs_of(
            partial(activations.swapped_final_hidden, i=i, layer=layer), parent.lm_head, heldout_ids, task)
        measured[(a, f)] = {m.name: m.compute(student, teacher) for m in metrics}
        advance()
    return {block_variant_name(a, f): {
        "stats": block_stats(costs, a, f),
        "metrics": measured.get((a, f)) or decoupled_estimate(measured, a, f, own),
        "scored": "replace-1-block" if (a, f) in measured else "decoupled",
        "attention": a,
        "ffn": f,
        "parent": (a, f) == own,
        "block_config": block.to_json(parent.block_types, parent.config),
    } for (a, f), block in blocks.items()}


@torch.inference_mode()
def score(parent: HeteroLlamaForCausalLM, library: Library, heldout_ids: torch.Tensor, metrics: list[Metric],
          costs: dict, out_dir: Path, task: MultipleChoice | None = None, pairs: str = "decoupled") -> dict:
    """Write ``block_library.json`` into ``out_dir`` (per-layer units are kept beside it until then).

    ``heldout_ids``: [sequences, tokens]. ``pairs``: ``"decoupled"`` or ``"coupled"`` (see the module
    docstring); anything else raises ``HwoptError``.
    """
    out_dir = Path(out_dir)
    activations = ParentActivations(parent)
    teacher = outputs_of(activations.final_hidden, parent.lm_head, heldout_ids, task)
    num_layers = len(parent.model.layers)
    names = [(library.variant_names(i, "attention"), library.variant_names(i, "ffn")) for i in range(num_layers)]
    runs = [pairs_to_run(a, f, pairs) for a, f in names]
    block_library = {}
    with progress(f"score (replace-1-block, {pairs})", total=sum(map(len, runs))) as advance:
        for i, (attention_names, ffn_names) in enumerate(names):
            unit = out_dir / "layers" / f"layer_{i}.json"
            if not unit.is_file():
                every_pair = [(a, f) for a in attention_names for f in ffn_names]
                atomic_write_json(unit, score_layer(parent, library, i, activations, teacher, heldout_ids, metrics,
                                                    costs, runs[i], every_pair, task, advance))
            else:
                advance(len(runs[i]))
            block_library[f"layer_{i}"] = json.loads(unit.read_text())
    atomic_write_json(out_dir / "block_library.json", block_library)
    return block_library


@torch.inference_mode()
def rescore_coupled(parent: HeteroLlamaForCausalLM, library: Library, block_library: dict,
                    subspace: dict[int, list[tuple[str, str]]], heldout_ids: torch.Tensor, metrics: list[Metric],
                    costs: dict, task: MultipleChoice | None = None) -> dict:
    """``block_library`` with the entries of ``subspace``'s pairs (layer -> pairs) scored again by
    replace-1-block with their coupled-BLD weights (``library`` built with ``coupled_dir``); marked
    ``"coupled": true``."""
    activations = ParentActivations(parent)
    teacher = outputs_of(activations.final_hidden, parent.lm_head, heldout_ids, task)
    out = {layer: dict(entries) for layer, entries in block_library.items()}
    with progress("score (coupled pairs)", total=sum(map(len, subspace.values()))) as advance:
        for i, pairs in subspace.items():
            entries = score_layer(parent, library, i, activations, teacher, heldout_ids, metrics, costs, pairs, pairs,
                                  task, advance)
            out[f"layer_{i}"].update({name: {**entry, "coupled": True} for name, entry in entries.items()})
    return out
