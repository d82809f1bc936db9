"""score: replace-1-block scoring, joined with costs into the block library.

For every layer i and every (attention, FFN) pair the library offers there,
the parent runs with exactly that one block swapped in, on held-out tokens,
and each metric compares its output with the parent's (KL divergence by
default; a task metric also runs the swapped model on the user's questions).
The parent's activations at every layer are computed once per input, so a
swapped forward starts at layer i rather than at the embeddings. The result
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

    def swapped_final_hidden(self, ids: torch.Tensor, i: int, layer: DecoderLayer) -> torch.Tensor:
        """The last hidden states, after the final norm, of the parent with layer ``i`` replaced by ``layer``."""
        hidden = self.at_layers(ids)
        position_embeddings = self.parent.position_embeddings(hidden[i], 0)
        x = self.parent.run_layers(layer(hidden[i], position_embeddings), position_embeddings, start=i + 1)
        return self.parent.model.norm(x)


def outputs_of(final_hidden: Callable[[torch.Tensor], torch.Tensor], lm_head: torch.nn.Module, ids: torch.Tensor,
               task: MultipleChoice | None) -> Outputs:
    """What a metric sees of a model given as its final hidden states on token ids."""
    hidden = final_hidden(ids)
    return Outputs(logits=lm_head(hidden).flatten(0, 1), hidden=hidden.flatten(0, 1), labels=next_token_labels(ids),
                   model=lambda x: lm_head(final_hidden(x)), task=task)


@torch.inference_mode()
def score(parent: HeteroLlamaForCausalLM, library: Library, heldout_ids: torch.Tensor, metrics: list[Metric],
          costs: dict, out_dir: Path, task: MultipleChoice | None = None) -> dict:
    """Write ``block_library.json`` into ``out_dir`` (per-layer units are kept beside it until then)."""
    out_dir = Path(out_dir)
    activations = ParentActivations(parent)
    teacher = outputs_of(activations.final_hidden, parent.lm_head, heldout_ids, task)
    num_layers = len(parent.model.layers)
    pairs = [(a, f) for i in range(num_layers)
             for a in library.variant_names(i, "attention") for f in library.variant_names(i, "ffn")]
    block_library = {}
    with progress("score (replace-1-block)", total=len(pairs)) as advance:
        for i in range(num_layers):
            unit = out_dir / "layers" / f"layer_{i}.json"
            attention_names, ffn_names = library.variant_names(i, "attention"), library.variant_names(i, "ffn")
            if not unit.is_file():
                entries = {}
                for a in attention_names:
                    for f in ffn_names:
                        layer = library.layer(i, a, f)
                        student = outputs_of(partial(activations.swapped_final_hidden, i=i, layer=layer),
                                             parent.lm_head, heldout_ids, task)
                        entries[block_variant_name(a, f)] = {
                            "stats": block_stats(costs, a, f),
                            "metrics": {m.name: m.compute(student, teacher) for m in metrics},
                            "attention": a,
                            "ffn": f,
                            "parent": a == attention_names[0] and f == ffn_names[0],
                            "block_config": layer.block.to_json(parent.block_types, parent.config),
                        }
                        advance()
                atomic_write_json(unit, entries)
            else:
                advance(len(attention_names) * len(ffn_names))
            block_library[f"layer_{i}"] = json.loads(unit.read_text())
    atomic_write_json(out_dir / "block_library.json", block_library)
    return block_library
