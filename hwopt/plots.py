"""Pictures a person would rather look at than a table.

``per_layer_runtime``: a child's attention and FFN runtime per layer next to
its parent's, in the shape of Figure 3 of NVIDIA's Nemotron-51B blog post.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from hwopt.pipeline import atomic_path


def became(row: dict) -> str:
    """What a layer became, for a tick label: e.g. ``kv1 / ffn768``, ``linear / removed``."""
    short = {"attn_linear": "linear", "ffn_linear": "linear", "attn_noop": "removed", "ffn_noop": "removed"}
    return f"{short.get(row['attention'], row['attention'])} / {short.get(row['ffn'], row['ffn'])}"


def per_layer_runtime(path: Path, child_rows: list[dict], parent_rows: list[dict] | None, title: str,
                      label_layers: bool = False, child_label: str = "child") -> None:
    """Two panels, attention above FFN: bars per layer, the parent's pale behind the child's.

    ``label_layers``: each layer's tick names what it became (KV heads, FFN width, linear, removed).
    ``child_label``: the legend's name for ``child_rows`` (e.g. "model" when there is no parent). Each line of
    ``title`` is wrapped to the picture's width.
    """
    # imported here, and without pyplot: matplotlib takes half a second to load, and only a picture needs it
    from matplotlib.figure import Figure

    width = max(8.0, len(child_rows) * 0.18)  # inches
    fig = Figure(figsize=(width, 7 if label_layers else 6))  # the labelled ticks take an inch
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, label in ((axes[0], "attention_ms", "attention"), (axes[1], "ffn_ms", "FFN")):
        if parent_rows is not None:
            ax.bar([r["layer"] for r in parent_rows], [r[key] for r in parent_rows], width=0.9,
                   color="#c8d6e5", label="parent")
        ax.bar([r["layer"] for r in child_rows], [r[key] for r in child_rows], width=0.55, color="#2e86de",
               label=child_label)
        ax.set_ylabel(f"{label} runtime (ms)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1].set_xlabel("layer: attention / FFN it became (removed: a no-op, attn_noop / ffn_noop in solve's table)"
                       if label_layers else "layer")
    if label_layers:
        axes[1].set_xticks([r["layer"] for r in child_rows],
                           [f"{r['layer']}: {became(r)}" for r in child_rows], rotation=90, fontsize=8)
    characters = int(width * 8)  # a line of the title at matplotlib's 12 pt, in inches of figure
    fig.suptitle("\n".join(textwrap.fill(line, characters) for line in title.splitlines()))
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
