"""Whether blocks that replace two parent layers pay: the MIP child with and without them, at equal budgets.

    python benchmarks/two_layer.py runs/demo [--speedups 1.5 2] [--uptrain-tokens N] [--json out.json]

Needs a run through the score pass (``hwopt optimize ... --until score``). A
run made without ``--two-layer`` gets its two-layer blocks here: trained by
BLD (``hwopt.two_layer``, the run's BLD tokens and learning rate) into
``RUN/bench_two_layer/`` (kept for a rerun) and scored by replace-2-blocks on
the run's held-out tokens; a run made with it has them already.

At each speedup the solve pass picks two children under the same
predicted-runtime budget: ``one_layer`` from the run's one-layer library,
``two_layer`` from the library with the two-layer blocks added. Each gets the
run's uptraining (GKD, same tokens and learning rate); then its generation
time is measured against the parent's on this machine (runs interleaved) and
its KL and perplexity on general English text no pass trained on
(``hwopt/heldout/general_english.txt``) and on the run's own held-out text.
Prints a table, and the wall time the two-layer BLD and scoring took;
``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hwopt.bld import BLDSettings, Library
from hwopt.errors import HwoptError
from hwopt.evaluate import compare_on_heldout, measure_runtimes
from hwopt.pipeline import atomic_write_json
from hwopt.run import Run, load_settings
from hwopt.scoring import with_costs
from hwopt.solving import Budgets, solve
from hwopt.two_layer import add_two_layer_entries, assemble_child, build_two_layer
from hwopt.uptraining import UptrainSettings, uptrain


def one_layer_only(block_library: dict) -> dict:
    """A block library without its two-layer blocks and the spanned entries they leave."""
    return {layer: {name: e for name, e in entries.items() if e.get("span", 1) == 1 and not e.get("spanned")}
            for layer, entries in block_library.items()}


def with_two_layer_blocks(run: Run) -> tuple[dict, Path, dict]:
    """The run's block library with two-layer blocks, their folder, and the wall time spent making them."""
    s = run.settings
    scored = run.read_json(run.output("score", "block_library"))
    if s.two_layer:
        return scored, run.output("library", "two_layer"), {}
    out = run.workdir / "bench_two_layer"
    library = Library(run.dir("library"), run.parent)
    start = time.perf_counter()
    build_two_layer(run.parent, library, run.split.train_batches(s.bld_tokens),
                    BLDSettings(tokens=s.bld_tokens, lr=s.bld_lr, seed=s.seed), out / "blocks")
    bld_s = time.perf_counter() - start
    blocks = Library(run.dir("library"), run.parent, out / "blocks")
    extended = with_costs(add_two_layer_entries(run.parent, blocks, scored, run.split.score_batches(s.score_tokens),
                                                run.metric_objects, run.task),
                          run.read_json(run.output("profile", "costs")))
    timing = {"two_layer_bld_s": bld_s, "two_layer_score_s": time.perf_counter() - start - bld_s}
    atomic_write_json(out / "block_library.json", extended)
    return extended, out / "blocks", timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    parser.add_argument("--uptrain-tokens", type=int, help="default: the run's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    run = Run(args.workdir, load_settings(args.workdir, {}))
    s = run.settings
    run.use_threads()
    costs = run.read_json(run.output("profile", "costs"))
    extended, blocks_dir, timing = with_two_layer_blocks(run)
    if timing:
        print(f"two-layer blocks: BLD {timing['two_layer_bld_s']:.0f} s, replace-2-blocks scoring "
              f"{timing['two_layer_score_s']:.0f} s", flush=True)
    libraries = {"one_layer": one_layer_only(extended), "two_layer": extended}
    one_layer_blocks = Library(run.dir("library"), run.parent)  # no coupled BLD here: both searches alike
    two_layer_blocks = Library(run.dir("library"), run.parent, blocks_dir)
    tokens = args.uptrain_tokens or s.uptrain_tokens
    own = run.split.heldout_batches(s.score_tokens)
    rows = []
    print(f"{'speedup':>7} {'search':>9} {'spans':>5} {'predicted':>9} {'measured':>8} {'gen KL':>7} "
          f"{'gen ppl':>8} {'own KL':>7} {'own ppl':>8}")
    for speedup in args.speedups:
        for search, library in libraries.items():
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    best = solve(library, costs, Budgets(speedup=speedup), s.objective_key, s.solver,
                                 Path(tmp) / "solutions.json", time_limit_s=s.time_limit)["solutions"][0]
            except HwoptError as exc:
                print(f"{speedup:>7.2f} {search:>9}  {exc}", flush=True)
                continue
            child = assemble_child(one_layer_blocks, two_layer_blocks, [tuple(v) for v in best["variants"]],
                                   best["spans"])
            stats = uptrain(child, run.parent, run.split.train_batches(tokens), run.split.score_batches(s.score_tokens),
                            UptrainSettings(tokens=tokens, lr=s.uptrain_lr, seed=s.seed))
            ms = measure_runtimes({"parent": run.parent, "child": child}, run.scenario, run.parent.config.vocab_size)
            general = compare_on_heldout(child, run.parent, run.general_heldout)
            heldout = compare_on_heldout(child, run.parent, own)
            row = {"search": search, "budget_speedup": speedup, "spans": best["spans"],
                   "predicted_speedup": best["predicted_speedup"], "measured_speedup": ms["parent"] / ms["child"],
                   "general_kl": general["kl_div"],
                   "general_ppl_ratio": general["perplexity"] / general["parent_perplexity"],
                   "own_kl": heldout["kl_div"], "own_ppl_ratio": heldout["perplexity"] / heldout["parent_perplexity"],
                   "objective": best["objective"], "uptrain": stats, "uptrain_tokens": tokens,
                   "variants": best["variants"], **timing}
            rows.append(row)
            print(f"{speedup:>7.2f} {search:>9} {len(best['spans']):>5} {row['predicted_speedup']:>8.2f}x "
                  f"{row['measured_speedup']:>7.2f}x {row['general_kl']:>7.3f} {row['general_ppl_ratio']:>7.2f}x "
                  f"{row['own_kl']:>7.3f} {row['own_ppl_ratio']:>7.2f}x", flush=True)
            if args.json:
                atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
