"""Puzzle's MIP child against the baselines at equal budgets, each uptrained alike, on unseen general text.

    python benchmarks/baselines.py runs/demo [--speedups 1.3 1.5 2] [--uptrain-tokens N] [--train-offset N]
                                             [--json out.json]

Needs a run through the score pass (``hwopt optimize ... --until score``). For
each speedup, five children are built from the run's block library under the
same predicted-runtime budget (parent runtime / speedup, from the profile):

- ``mip``: the solve pass's MIP (SCIP), least summed replace-1-block objective (the MIP's own child: the solve
  pass then also weighs the layer-dropping child, ``hwopt.selection``, and may keep that one instead);
- ``greedy``: the same objective, the budget-constrained greedy solver;
- ``max_params``: the most parameters within the budget (Puzzle Table 12);
- ``layer_drop``: whole layers of lowest block influence removed (ShortGPT);
- ``uniform``: one KV-head count and FFN width for every layer.

Each child gets the run's uptraining (GKD, same tokens and learning rate;
``--train-offset`` takes them from further into the training data, to see
how much the result depends on which tokens they are). Then its generation
time is measured against the parent's on this machine (paired interleaved
runs, both in the scenario's dtype as they serve, as the solve pass's speed
check does), and its KL and perplexity on general English text no pass
trained on (``hwopt/heldout/general_english.txt``), before uptraining
(``kl_before``) and after.
Each row also carries ``objective``, the summed replace-1-block score that
the MIP minimises (from the library; none for a choice of two-layer blocks):
the MIP's is the least of all at its budget, so where another method's child
ends up with lower KL, the objective's gaps against the KL's say whether the
search or its proxy is at fault. Prints a table (a measured speedup marked
``!`` was taken while other processes kept the cores busy: rerun on a quiet
machine); writes ``<json>`` rows ``{"method", "measured_speedup",
"heldout_kl", "heldout_ppl", "kl_before", "objective", ...}`` and a frontier
plot ``<json stem>.png``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from hwopt.baselines import block_influence, layer_drop, predicted_runtime_ms, uniform_width
from hwopt.errors import HwoptError
from hwopt.evaluate import compare_on_heldout, measured_speedup
from hwopt.pipeline import atomic_path, atomic_write_json
from hwopt.problem import problem_from_library
from hwopt.run import Run, load_settings
from hwopt.search_space import block_variant_name
from hwopt.solving import Budgets, solve
from hwopt.uptraining import UptrainSettings, uptrain

SEARCHED = {"mip": ("scip", None, False), "greedy": ("greedy", None, False),
            "max_params": ("scip", "stats.num_params", True)}


def parent_choice(run: Run) -> list[tuple[str, str]]:
    """The parent's own (attention, FFN) variant names, layer by layer."""
    lib = run.library()
    return [(lib.variant_names(i, "attention")[0], lib.variant_names(i, "ffn")[0])
            for i in range(run.source.config.num_hidden_layers)]


def summed_objective(library: dict, objective: str, choice: list[tuple[str, str]]) -> float | None:
    """The summed replace-1-block ``objective`` of one (attention, FFN) choice per layer, as the solve pass totals it
    (None where a layer's choice is not a one-layer entry of ``library``)."""
    problem = problem_from_library(library, objective, [])
    names = {layer: block_variant_name(*pair) for layer, pair in zip(problem.layers, choice)}
    if any(name not in library[layer] for layer, name in names.items()):
        return None
    return problem.totals(names)[objective]


def children(run: Run, library: dict, costs: dict, speedup: float, methods: list[str]) -> dict[str, dict]:
    """Each of ``methods``' child at ``parent runtime / speedup``: its (attention, FFN) choice per layer
    (``"variants"``) and the layers holding two-layer blocks (``"spans"``), as ``Run.assemble`` takes them."""
    parent = parent_choice(run)
    budget_ms = predicted_runtime_ms(costs, parent) / speedup
    choices = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, (solver, objective, maximize) in SEARCHED.items():
            if method not in methods:
                continue
            result = solve(library, costs, Budgets(speedup=speedup), objective or run.settings.objective_key, solver,
                           Path(tmp) / "solutions.json", maximize, time_limit_s=run.settings.time_limit)
            best = result["solutions"][0]
            choices[method] = {"variants": [tuple(v) for v in best["variants"]], "spans": best["spans"]}
    if "layer_drop" in methods:
        influence = block_influence(run.parent, run.split.score_batches(run.settings.score_tokens))
        choices["layer_drop"] = {"variants": layer_drop(parent, influence, costs, budget_ms)[0], "spans": []}
    if "uniform" in methods:
        try:
            choices["uniform"] = {"variants": uniform_width(costs, len(parent), budget_ms), "spans": []}
        except HwoptError as err:  # the library's widths cannot be that fast with every layer kept: no row, said why
            print(f"{speedup:>7.2f} {'uniform':>11}  none: {err}", flush=True)
    return choices


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    for ax, key, label in zip(fig.subplots(1, 2), ("heldout_kl", "heldout_ppl"),
                              ("KL from parent, general English", "perplexity, general English")):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["measured_speedup"])
            ax.plot([r["measured_speedup"] for r in mine], [r[key] for r in mine], marker="o", label=method)
        ax.set_xlabel("measured speedup on this CPU")
        ax.set_ylabel(label)
    fig.axes[1].set_yscale("log")  # the worst methods are orders of magnitude off; the close ones stay apart
    fig.axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.3, 1.5, 2.0])
    parser.add_argument("--methods", nargs="+", default=[*SEARCHED, "layer_drop", "uniform"])
    parser.add_argument("--uptrain-tokens", type=int, help="default: the run's")
    parser.add_argument("--train-offset", type=int, default=0,
                        help="uptrain on the tokens that follow the first TRAIN_OFFSET of the run's training data")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    run = Run(args.workdir, load_settings(args.workdir, {}))
    s = run.settings
    # with --coupled-bld, the solve pass's library holds the coupled pairs' scores
    coupled = (run.dir("solve") / "block_library.json").is_file()
    library = run.read_json("solve/block_library.json" if coupled else "score/block_library.json")
    costs = run.read_json("profile/costs.json")
    parent_ms = predicted_runtime_ms(costs, parent_choice(run))
    tokens = args.uptrain_tokens or s.uptrain_tokens
    rows = []
    train_ids = run.split.train_batches(args.train_offset + tokens)[args.train_offset // s.seq_len:]
    print(f"{'speedup':>7} {'method':>11} {'objective':>9} {'predicted':>9} {'measured':>14} {'KL before':>9} "
          f"{'KL':>7} {'ppl ratio':>9}")
    for speedup in args.speedups:
        for method, solution in children(run, library, costs, speedup, args.methods).items():
            choice = solution["variants"]
            child = run.assemble(solution)
            served = next(child.parameters()).dtype == run.deployed.dtype
            as_served = child if served else copy.deepcopy(child).to(run.deployed.dtype)
            before = compare_on_heldout(as_served, run.deployed_parent, run.general_heldout)["kl_div"]
            uptrain(child, run.parent, train_ids, run.split.score_batches(s.score_tokens),
                    UptrainSettings(tokens=tokens, lr=s.uptrain_lr, seed=s.seed), run.placement)
            # timed and compared as they serve, as the solve pass's check and the closing report do: the teacher
            # (run.parent) is in the train dtype, which need not be the scenario's
            child = child.to(run.deployed.dtype)
            timing = measured_speedup(run.deployed_parent, child, run.scenario)
            quality = compare_on_heldout(child, run.deployed_parent, run.general_heldout)
            row = {"method": method, "budget_speedup": speedup,
                   "objective": summed_objective(library, s.objective_key, choice), "kl_before": before,
                   "predicted_speedup": parent_ms / predicted_runtime_ms(costs, choice),
                   "measured_speedup": timing["measured_speedup"], "measured_error": timing["error"],
                   "measured_while_disturbed": timing["disturbed"], "heldout_kl": quality["kl_div"],
                   "heldout_ppl": quality["perplexity"], "parent_ppl": quality["parent_perplexity"],
                   "uptrain_tokens": tokens, "train_offset": args.train_offset, "choice": choice}
            rows.append(row)
            measured = f"{row['measured_speedup']:.2f}x ± {row['measured_error']:.0%}" + "!" * timing["disturbed"]
            objective = "-" if row["objective"] is None else f"{row['objective']:.3f}"
            print(f"{speedup:>7.2f} {method:>11} {objective:>9} {row['predicted_speedup']:>8.2f}x {measured:>14} "
                  f"{before:>9.3f} {row['heldout_kl']:>7.3f} {row['heldout_ppl'] / row['parent_ppl']:>8.2f}x",
                  flush=True)
            if args.json:
                atomic_write_json(args.json, rows)
    if args.json:
        plot(rows, args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
