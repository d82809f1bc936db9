"""score: replace-1-block scoring, joined with costs into the block library.

For every layer i and every (attention, FFN) pair the library offers there,
the parent runs with exactly that one block swapped in, on held-out tokens,
and each metric compares its output with the parent's (KL divergence by
default). The parent's activations at every layer are computed once, so a
swapped forward starts at layer i rather than at the embeddings. The result
is ``block_library.json`` in the format of NVIDIA's Puzzle demo library:
per layer and variant, ``stats`` (costs from the profile) and ``metrics``.
Each finished layer is saved on its own; a rerun picks up from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.passes.library import Library
from hwopt.pipeline import atomic_write_json
from hwopt.progress import progress
from hwopt.search_space import block_variant_name

COST_KEYS = ("runtime_ms", "prefill_ms", "decode_ms", "memory_mib", "weights_mib", "kv_cache_mib", "num_params")


def block_stats(costs: dict, attention: str, ffn: str) -> dict:
    """A block's costs: its attention's plus its FFN's, with where the figures came from."""
    a, f = costs["attention"][attention], costs["ffn"][ffn]
    stats = {key: a[key] + f[key] for key in COST_KEYS}
    src = costs["source"]
    stats["source"] = f"{src['kind']} on {src['device']} with {src['backend']}"
    return stats


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels for every position, -100 where the next token is not known."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.flatten()


@torch.inference_mode()
def score(parent: HeteroLlamaForCausalLM, library: Library, heldout_ids: torch.Tensor, metrics: list,
          costs: dict, out_dir: Path) -> dict:
    """Write ``block_library.json`` into ``out_dir`` (per-layer units are kept beside it until then)."""
    out_dir = Path(out_dir)
    parent_out = parent(heldout_ids, output_hidden_states=True)
    teacher = parent_out.logits.flatten(0, 1)
    labels = next_token_labels(heldout_ids)
    position_embeddings = parent.position_embeddings(parent_out.hidden_states[0], 0)
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
                        x = layer(parent_out.hidden_states[i], position_embeddings)
                        logits = parent.head(parent.run_layers(x, position_embeddings, start=i + 1)).flatten(0, 1)
                        entries[block_variant_name(a, f)] = {
                            "stats": block_stats(costs, a, f),
                            "metrics": {m.name: m.compute(logits, teacher, labels) for m in metrics},
                            "attention": a,
                            "ffn": f,
                            "parent": a == attention_names[0] and f == ffn_names[0],
                            "block_config": layer.block.to_json(parent.config.hidden_size),
                        }
                        advance()
                atomic_write_json(unit, entries)
            else:
                advance(len(attention_names) * len(ffn_names))
            block_library[f"layer_{i}"] = json.loads(unit.read_text())
    atomic_write_json(out_dir / "block_library.json", block_library)
    return block_library
