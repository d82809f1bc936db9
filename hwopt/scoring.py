"""The score pass's work (``hwopt.passes.score``): replace-1-block scores, joined with the costs.

For every layer i and every (attention, FFN) pair the library offers there,
the parent runs with exactly that one block swapped in, on held-out tokens,
and each metric compares its output with the parent's (KL divergence by
default; a task metric also runs the swapped model on the user's questions).
The parent is never whole in memory: its layers are streamed in order
(``replace_one_block``), and each swapped layer's output is carried through
the parent's later layers beside the parent's own, so no forward starts
again from the embeddings and each layer is read once per wave. Each
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
Each finished layer's metrics are saved on its own (a unit); a rerun picks up
from there. The metrics do not depend on the profile's costs, so they are
joined with them in a last, cheap step (``with_costs``): a profile timed
again changes the costs, not the metrics. The result is ``block_library.json``
in the format of NVIDIA's Puzzle demo library: per layer and variant,
``stats`` (costs from the profile) and ``metrics``. Under torchrun the layers
are dealt over the ranks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

from hwopt.bld import Library, Parent
from hwopt.distributed import ONE_PROCESS, Ranks
from hwopt.errors import HwoptError
from hwopt.metric import Metric, Outputs
from hwopt.model.config import BlockConfig
from hwopt.model.modeling import DecoderLayer
from hwopt.pipeline import atomic_write_json
from hwopt.progress import console, progress
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


def with_costs(scored: dict, costs: dict) -> dict:
    """The block library of ``scored`` (layer -> variant -> entry, as scoring writes it: no costs): each entry with
    the ``stats`` of its attention and FFN (``block_stats``) from the profile's ``costs``, first."""
    def joined(entry: dict) -> dict:
        rest = {key: value for key, value in entry.items() if key != "stats"}  # an earlier join's, if any
        return {"stats": block_stats(costs, entry["attention"], entry["ffn"]), **rest}

    return {layer: {name: joined(entry) for name, entry in entries.items()} for layer, entries in scored.items()}


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels for every position, -100 where the next token is not known."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.flatten()


def swapped_final_hidden(parent: Parent, ids: torch.Tensor, swap: tuple[int, DecoderLayer] | None = None,
                         span: int = 1) -> torch.Tensor:
    """The last layer's output [sequences, tokens, hidden] of the parent on ``ids``, with its ``span`` layers
    from ``swap[0]`` on replaced by ``swap[1]`` if given (``span=2``: a two-layer block), run a layer at a time
    (a ``LayerwiseParent`` reads each from disk in turn)."""
    x = parent.embedding()(ids.to(parent.device))
    position_embeddings = parent.position_embeddings(x, 0)
    for i in range(parent.num_layers):
        if swap and swap[0] < i < swap[0] + span:
            continue
        layer = swap[1] if swap and swap[0] == i else parent.decoder_layer(i)
        x = layer(x, position_embeddings)
    return x


def swapped_logits(parent: Parent, ids: torch.Tensor, swap: tuple[int, DecoderLayer] | None = None,
                   span: int = 1) -> torch.Tensor:
    """Logits [sequences, tokens, vocab] of ``swapped_final_hidden``. What a metric that evaluates its own
    inputs (a task's questions) calls."""
    norm, lm_head = parent.output_head()
    return lm_head(norm(swapped_final_hidden(parent, ids, swap, span)))


def swapped_student_logits(parent: Parent, library: Library, swap: tuple[int, str, str], ids: torch.Tensor
                           ) -> torch.Tensor:
    """``swapped_logits`` with layer ``swap[0]`` assembled from the library's (attention, FFN) pair ``swap[1:]``."""
    return swapped_logits(parent, ids, swap=(swap[0], library.layer(*swap)))


def outputs_of(final_hidden: torch.Tensor, head: tuple[torch.nn.Module, torch.nn.Module], ids: torch.Tensor,
               model: Callable[[torch.Tensor], torch.Tensor], task: MultipleChoice | None) -> Outputs:
    """What a metric sees of a model given its last layer's output [sequences, tokens, hidden] on ``ids``."""
    norm, lm_head = head
    hidden = norm(final_hidden)
    return Outputs(logits=lm_head(hidden).flatten(0, 1), hidden=hidden.flatten(0, 1),
                   labels=next_token_labels(ids).to(hidden.device), model=model, task=task)


def waves(jobs: dict[int, list], state_bytes: int, budget_bytes: int) -> list[list[int]]:
    """The swapped layers of ``jobs`` (layer -> forwards to run) in groups, in order, whose carried hidden states
    (``state_bytes`` each) fit ``budget_bytes`` together; a layer whose own forwards do not fit is a group."""
    groups, size = [], 0
    for i in sorted(jobs):
        need = len(jobs[i]) * state_bytes
        if not groups or (need and size + need > budget_bytes):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += need
    return groups


def replace_one_block(parent: Parent, library: Library, ids: torch.Tensor, jobs: dict[int, list[tuple[str, str]]],
                      budget_bytes: int, advance: Callable[[], None] = lambda: None
                      ) -> Iterator[tuple[list[int], torch.Tensor, dict[tuple[int, str, str], torch.Tensor]]]:
    """The parent's last-layer output on ``ids`` [sequences, tokens], and that of the parent with layer ``i``
    replaced by each (attention, FFN) pair of ``jobs[i]``, for every ``i`` of ``jobs``, [sequences, tokens,
    hidden] each.

    The parent's layers are streamed in order (one in memory at a time). A swapped layer's output is carried
    through the parent's later layers beside the parent's own hidden state, so no forward starts again from
    the embeddings. The carried states are held for one wave of swapped layers at a time (``waves``, at most
    ``budget_bytes`` together); each wave streams the parent from its first swapped layer to the end, starting
    from the parent's hidden state kept there by the wave before. Yields once per wave: (its layers, the
    parent's output, {(layer, attention, ffn): output}).
    """
    ids = ids.to(parent.device)
    x = parent.embedding()(ids)
    position_embeddings = parent.position_embeddings(x, 0)
    groups = waves(jobs, x.numel() * x.element_size(), budget_bytes)
    start = 0
    for n, group in enumerate(groups):
        next_start = groups[n + 1][0] if n + 1 < len(groups) else None
        carried: dict[tuple[int, str, str], torch.Tensor] = {}
        for j in range(start, parent.num_layers):
            if j == next_start:
                resume = x
            layer = parent.decoder_layer(j)
            carried = {key: layer(h, position_embeddings) for key, h in carried.items()}
            if j in group:
                for a, f, swapped in library.layers(j, jobs[j], layer):
                    carried[(j, a, f)] = swapped(x, position_embeddings)
                    advance()
            x = layer(x, position_embeddings)
        yield group, x, carried
        if next_start is not None:
            x, start = resume, next_start


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


def layer_entries(library: Library, i: int, measured: dict[tuple[str, str], dict[str, float]],
                  pairs: list[tuple[str, str]]) -> dict:
    """Block-library entries of layer ``i`` for ``pairs``, without costs (``with_costs`` joins them): measured
    where ``measured`` has them, else estimated (``decoupled_estimate``)."""
    own = (library.variant_names(i, "attention")[0], library.variant_names(i, "ffn")[0])
    config = library.config
    return {block_variant_name(a, f): {
        "metrics": measured.get((a, f)) or decoupled_estimate(measured, a, f, own),
        "scored": "replace-1-block" if (a, f) in measured else "decoupled",
        "attention": a,
        "ffn": f,
        "parent": (a, f) == own,
        "block_config": BlockConfig(library.sub_variant(i, "attention", a).config, library.sub_variant(i, "ffn", f)
                                    .config).to_json(library.parent.block_types, config),
    } for a, f in pairs}


def measure(parent: Parent, library: Library, ids: torch.Tensor, jobs: dict[int, list[tuple[str, str]]],
            metrics: list[Metric], task: MultipleChoice | None, budget_bytes: int,
            advance: Callable[[], None] = lambda: None) -> Iterator[tuple[int, dict[tuple[str, str], dict]]]:
    """Replace-1-block metrics per layer of ``jobs`` (layer -> pairs), yielded a layer at a time: (layer,
    {pair: {metric: value}}). The parent's own pair is the teacher itself, scored without a forward."""
    own = {i: (library.variant_names(i, "attention")[0], library.variant_names(i, "ffn")[0]) for i in jobs}
    forwards = {i: [pair for pair in pairs if pair != own[i]] for i, pairs in jobs.items()}
    head = parent.output_head()
    teacher = None
    for group, parent_out, swapped in replace_one_block(parent, library, ids, forwards, budget_bytes, advance):
        if teacher is None:
            teacher = outputs_of(parent_out, head, ids, partial(swapped_logits, parent), task)
        for i in group:
            measured = {own[i]: {m.name: m.compute(teacher, teacher) for m in metrics}} if own[i] in jobs[i] else {}
            for a, f in forwards[i]:
                model = partial(swapped_student_logits, parent, library, (i, a, f))  # read only if a metric asks
                student = outputs_of(swapped.pop((i, a, f)), head, ids, model, task)
                measured[(a, f)] = {m.name: m.compute(student, teacher) for m in metrics}
            yield i, measured


CARRY_BYTES = 1 << 30  # default budget of replace_one_block's carried hidden states


@torch.inference_mode()
def score_metrics(parent: Parent, library: Library, heldout_ids: torch.Tensor, metrics: list[Metric], units_dir: Path,
                  task: MultipleChoice | None = None, pairs: str = "decoupled", ranks: Ranks = ONE_PROCESS,
                  carry_bytes: int = CARRY_BYTES) -> dict:
    """Every layer's block-library entries without costs (layer -> variant -> entry; ``with_costs`` joins them).

    Each layer's entries are a unit, ``units_dir/layer_<i>.json``: a layer whose unit is there already is not
    scored again. ``parent``: the model, or a ``LayerwiseParent`` (never whole in memory). ``heldout_ids``:
    [sequences, tokens]. ``pairs``: ``"decoupled"`` or ``"coupled"`` (see the module docstring); anything else
    raises ``HwoptError``. Under torchrun, layers are dealt round-robin over ``ranks``, and every rank returns
    once all are done. ``carry_bytes``: the budget of carried hidden states (see ``replace_one_block``).
    """
    names = [(library.variant_names(i, "attention"), library.variant_names(i, "ffn")) for i in range(parent.num_layers)]
    runs = [pairs_to_run(a, f, pairs) for a, f in names]
    units = [Path(units_dir) / f"layer_{i}.json" for i in range(parent.num_layers)]
    owned = [i for i in range(parent.num_layers) if ranks.owns(i)]
    jobs = {i: runs[i] for i in owned if not units[i].is_file()}
    if len(jobs) < len(owned):
        console.print(f"score: the metrics of {len(owned) - len(jobs)} of {len(owned)} layers are kept from before")
    if jobs:
        with progress(f"score (replace-1-block, {pairs})", total=sum(len(r) - 1 for r in jobs.values())) as advance:
            for i, measured in measure(parent, library, heldout_ids, jobs, metrics, task, carry_bytes, advance):
                every_pair = [(a, f) for a in names[i][0] for f in names[i][1]]
                atomic_write_json(units[i], layer_entries(library, i, measured, every_pair))
    ranks.barrier()
    return {f"layer_{i}": json.loads(unit.read_text()) for i, unit in enumerate(units)}


@torch.inference_mode()
def rescore_coupled(parent: Parent, library: Library, block_library: dict, subspace: dict[int, list[tuple[str, str]]],
                    heldout_ids: torch.Tensor, metrics: list[Metric], costs: dict, task: MultipleChoice | None = None,
                    carry_bytes: int = CARRY_BYTES) -> dict:
    """``block_library`` with the entries of ``subspace``'s pairs (layer -> pairs) scored again by
    replace-1-block with their coupled-BLD weights (``library`` built with ``coupled_dir``); marked
    ``"coupled": true``."""
    rescored = {}
    with progress("score (coupled pairs)", total=sum(map(len, subspace.values()))) as advance:
        for i, measured in measure(parent, library, heldout_ids, subspace, metrics, task, carry_bytes, advance):
            entries = layer_entries(library, i, measured, subspace[i])
            rescored[f"layer_{i}"] = {name: {**entry, "coupled": True} for name, entry in entries.items()}
    rescored = with_costs(rescored, costs)
    return {layer: {**entries, **rescored.get(layer, {})} for layer, entries in block_library.items()}
