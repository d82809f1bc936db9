"""The run's child against its distillation budget: KL and perplexity ratio on unseen general English.

    python benchmarks/quality_vs_tokens.py runs/demo [--tokens 16384 65536 262144] [--distill-samples N]
        [--lr LR] [--train-dtype bf16|fp32] [--json out.json]

Needs a run through the solve pass. For each budget the child the solve pass
chose is assembled afresh from the library and uptrained (GKD) on that many
training tokens (the corpus and parent samples alternating while samples
last, cycled if fewer are available), then measured against the parent on
``hwopt/heldout/general_english.txt`` and on the run's own held-out text.
``--distill-samples``, ``--lr`` and ``--train-dtype`` try another number of
parent-sampled tokens, learning rate or uptraining precision than the run's
(the library and the child stay the run's; bf16 is mixed precision: fp32
weights, the teacher and the forwards in bf16; both models are measured in
the scenario's dtype, as the report does). Each row says how long its uptraining took (wall seconds,
on this machine under whatever load it had). Prints a table; ``--json``
writes the rows and ``<stem>.png``, the plot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hwopt.devices import TRAIN_DTYPES
from hwopt.evaluate import compare_on_heldout
from hwopt.pipeline import atomic_path, atomic_write_json
from hwopt.run import Run
from hwopt.settings import EVALUATION_TOKENS, load_settings
from hwopt.uptraining import UptrainSettings, uptrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--tokens", nargs="+", type=int, default=[16384, 65536, 262144])
    parser.add_argument("--distill-samples", type=int, help="parent-sampled tokens in the data (default: the run's)")
    parser.add_argument("--lr", type=float, help="uptraining learning rate (default: the run's)")
    parser.add_argument("--train-dtype", choices=TRAIN_DTYPES, help="uptraining precision (default: the run's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    run = Run(args.workdir, load_settings(args.workdir, {"distill_samples": args.distill_samples,
                                                         "uptrain_lr": args.lr, "train_dtype": args.train_dtype}))
    s, placement = run.settings, run.placement
    parent = run.deployed_parent  # the models compared as they serve; the teacher is run.parent
    solution = run.read_json("solve/solutions.json")["solutions"][0]
    own = run.split.heldout_batches(EVALUATION_TOKENS)  # as the closing report measures it
    distinct = len(run.split.train) * run.split.train.shape[1]
    rows = []
    print(f"data: {run.split.source}; uptraining lr {s.uptrain_lr:g} on {placement.describe()}", flush=True)
    print(f"{'tokens':>8} {'general KL':>10} {'general ppl':>11} {'own KL':>7} {'own ppl':>8} {'uptrain s':>9}  "
          "(ppl as child / parent)")
    for tokens in args.tokens:
        child = run.assemble(solution)
        start = time.perf_counter()
        stats = uptrain(child, run.parent, run.split.train_batches(tokens), run.split.score_batches(s.score_tokens),
                        UptrainSettings(tokens=tokens, lr=s.uptrain_lr, seed=s.seed), placement)
        seconds = time.perf_counter() - start
        general, heldout = (compare_on_heldout(child, parent, ids) for ids in (run.general_heldout, own))
        row = {"uptrain_tokens": tokens, "distinct_training_tokens": min(tokens, distinct),
               "distill_samples": s.distill_samples, "lr": s.uptrain_lr, "train_dtype": placement.dtype_name,
               "uptrain_s": seconds,
               "kept_uptrained_weights": stats["kept_uptrained_weights"], "general_kl": general["kl_div"],
               "general_ppl_ratio": general["perplexity"] / general["parent_perplexity"],
               "own_kl": heldout["kl_div"], "own_ppl_ratio": heldout["perplexity"] / heldout["parent_perplexity"]}
        rows.append(row)
        print(f"{tokens:>8} {row['general_kl']:>10.3f} {row['general_ppl_ratio']:>10.2f}x {row['own_kl']:>7.3f} "
              f"{row['own_ppl_ratio']:>7.2f}x {seconds:>9.0f}", flush=True)
        if args.json:
            atomic_write_json(args.json, rows)
    if args.json:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4))
        for ax, key, label in zip(fig.subplots(1, 2), ("kl", "ppl_ratio"), ("KL from parent", "perplexity / parent's")):
            for where in ("general", "own"):
                ax.plot([r["uptrain_tokens"] for r in rows], [r[f"{where}_{key}"] for r in rows], marker="o",
                        label=f"{where} held-out")
            ax.set_xscale("log")
            ax.set_xlabel("uptraining tokens")
            ax.set_ylabel(label)
            ax.legend()
        fig.tight_layout()
        with atomic_path(args.json.with_suffix(".png")) as tmp:
            fig.savefig(tmp, dpi=110, format="png")


if __name__ == "__main__":
    main()
