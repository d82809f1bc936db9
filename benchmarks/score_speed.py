"""The score pass before and after, on the same library, tokens and layers, timed in one run.

    python benchmarks/score_speed.py runs/demo [--layers 0 10 20] [--tokens 512]

Needs a run through the library pass. Three ways of scoring the same layers:

- ``before``: the score pass as it was: every (attention, FFN) pair
  assembled by ``Library.layer`` (both variants read from disk for every
  partner) and run, the parent's own pair included;
- ``coupled``: every pair, each variant read once per layer, the parent's own
  pair not rerun, the parent streamed a layer at a time
  (``hwopt score --score-pairs coupled``);
- ``decoupled``: the default (``--score-pairs decoupled``).

Prints the seconds of each and the speedups, and how well the decoupled
estimates rank each layer's pairs against the exact scores (Spearman's rho,
mean over layers) and their median relative error. The
machine may be shared: all three run back to back, in the same process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from hwopt.bld import Library
from hwopt.builtin.metrics import KLDivergence
from hwopt.run import Run, load_settings
from hwopt.scoring import outputs_of, score_metrics


def subset(library: Library, layers: list[int]) -> Library:
    """The library restricted to ``layers`` (the others keep only the parent's own pair)."""
    for i, entry in library.index["layers"].items():
        if int(i.split("_")[1]) not in layers:
            for kind in ("attention", "ffn"):
                entry[kind] = dict(list(entry[kind].items())[:1])
    return library


@torch.inference_mode()
def score_before(parent, library: Library, ids: torch.Tensor, layers: list[int]) -> dict:
    """The former score pass's loop, KL only: the whole parent's hidden states at every layer kept, then one fresh
    ``Library.layer`` and forward from layer i per pair."""
    hidden = parent(ids, output_hidden_states=True).hidden_states
    position_embeddings = parent.position_embeddings(hidden[0], 0)
    head = parent.output_head()
    teacher = outputs_of(hidden[-1], head, ids, None, None)
    kl = KLDivergence()
    out = {}
    for i in layers:
        for a in library.variant_names(i, "attention"):
            for f in library.variant_names(i, "ffn"):
                layer = library.layer(i, a, f)
                x = parent.run_layers(layer(hidden[i], position_embeddings), position_embeddings, start=i + 1)
                out[(i, f"{a}+{f}")] = kl.compute(outputs_of(x, head, ids, None, None), teacher)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--layers", nargs="+", type=int, default=[0, 10, 20])
    parser.add_argument("--tokens", type=int, help="held-out tokens (default: the run's --score-tokens)")
    args = parser.parse_args()

    run = Run(args.workdir, load_settings(args.workdir, {}))
    ids = run.split.score_batches(args.tokens or run.settings.score_tokens)
    seconds, results = {}, {}
    start = time.perf_counter()
    before = score_before(run.parent, Library(run.dir("library"), run.parent), ids, args.layers)
    seconds["before"] = time.perf_counter() - start
    for pairs in ("coupled", "decoupled"):
        library = subset(Library(run.dir("library"), run.parent), args.layers)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            results[pairs] = score_metrics(run.parent, library, ids, [KLDivergence()], Path(tmp), pairs=pairs)
            seconds[pairs] = time.perf_counter() - start  # includes the other layers' parent pairs (no forward)
    print(f"layers {args.layers}, {ids.numel()} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, s in seconds.items():
        print(f"{name:>10}: {s:8.1f} s   {seconds['before'] / s:5.2f}x")
    exact = {(i, k): e["metrics"]["kl_div"] for i in args.layers for k, e in results["coupled"][f"layer_{i}"].items()}
    drift = max(abs(exact[k] - v) for k, v in before.items())
    print(f"coupled vs before: largest KL difference {drift:.2e}")
    rhos, errors = [], []
    for i in args.layers:
        names = list(results["coupled"][f"layer_{i}"])
        true = [exact[(i, n)] for n in names]
        estimated = [results["decoupled"][f"layer_{i}"][n]["metrics"]["kl_div"] for n in names]
        rhos.append(spearmanr(true, estimated).statistic)
        errors += [abs(e - t) / t for t, e in zip(true, estimated) if t > 0]
    errors.sort()
    print(f"decoupled estimates vs exact pair KL: Spearman rho {sum(rhos) / len(rhos):.3f} (mean over layers), "
          f"median relative error {errors[len(errors) // 2]:.2f}")


if __name__ == "__main__":
    main()
