"""Candidate children compared whole after a short distillation; solve puts the best first, for uptrain.

Why: the MIP minimises a sum of replace-1-block scores, each measured with
the rest of the parent intact and before global distillation (GKD). That sum
ranks children by how far they start from the parent, not by how close GKD
brings them. On SmolLM2-135M at 1.5x on this CPU the layer-dropping child
(ShortGPT) starts further away than the MIP's (summed score 3.00 against
1.58; whole-child KL 2.99 against 1.81 on the scoring text) and ends closer
on human prose after the same GKD (KL 0.897 against 0.987 on general English
after 294,912 tokens): uptraining recovers whole layers removed better than
attention removed or made linear and FFNs narrowed across many layers.

So solve gives each candidate, the MIP's solutions (``--num-solutions``) and
the layer-dropping child at no more predicted runtime than the MIP's first
(``hwopt.baselines.layer_drop``), ``--select-tokens`` of GKD at the run's
uptraining learning rate, measures its KL from the parent on validation
English (``hwopt.data.VALIDATION_ENGLISH``: human prose nothing trains on),
and puts the lowest first in ``solutions.json``. The figures behind this are
in README.md ("Which child solve keeps").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.baselines import block_influence, layer_drop
from hwopt.errors import HwoptError
from hwopt.progress import console
from hwopt.search_space import block_variant_name
from hwopt.solving import MEMORY, RUNTIME, library_problem, maximizes, solution_entry

if TYPE_CHECKING:
    from hwopt.run import Run

LAYER_DROP = "layer_drop"
REMOVED = ("attn_noop", "ffn_noop")  # a whole layer dropped: the library's no-op attention and FFN


def layer_drop_entry(run: Run, library: dict, costs: dict, budget_ms: float) -> dict | None:
    """The layer-dropping child (``hwopt.baselines.layer_drop``, block influence on the scoring text) within
    ``budget_ms`` of predicted runtime, as ``solutions.json`` holds a solution; None where the library has no
    no-op blocks (``--no-op`` off) or dropping layers cannot reach the budget."""
    s = run.settings
    problem = library_problem(library, costs, s.objective_key, maximizes(s.objective_key))
    if any(block_variant_name(*REMOVED) not in library[layer] for layer in problem.layers):
        return None
    parent_choice = [tuple(library[layer][problem.parent[layer]][k] for k in ("attention", "ffn"))
                     for layer in problem.layers]
    influence = block_influence(run.parent, run.split.score_batches(s.score_tokens))
    try:
        choice, _ = layer_drop(parent_choice, influence, costs, budget_ms, REMOVED)
    except HwoptError:
        return None
    names = {layer: block_variant_name(*pair) for layer, pair in zip(problem.layers, choice, strict=True)}
    solution = problem.solution(names, LAYER_DROP, "heuristic", math.inf, 0.0)
    return solution_entry(library, problem, problem.totals(problem.parent, (RUNTIME, MEMORY)), solution)


def validation_kl(run: Run, solution: dict, coupled_dir: Path | None) -> float:
    """KL(parent || child) per token on validation English of ``solution``'s child after ``--select-tokens`` of
    GKD (the first training tokens, the run's uptraining learning rate and seed)."""
    from hwopt.evaluate import compare_on_heldout
    from hwopt.uptraining import UptrainSettings, uptrain

    s = run.settings
    child = run.assemble(solution, coupled_dir)
    uptrain(child, run.parent, run.split.train_batches(s.select_tokens), run.split.score_batches(s.score_tokens),
            UptrainSettings(tokens=s.select_tokens, lr=s.uptrain_lr, seed=s.seed), run.placement)
    return compare_on_heldout(child, run.deployed_parent, run.validation_english)["kl_div"]


def select(run: Run, result: dict, library: dict, costs: dict, coupled_dir: Path | None = None,
           measure: Callable[[dict], dict] | None = None) -> dict:
    """``result`` (``solve``'s) with the candidates (see the module docstring) in order of validation KL, the
    lowest first, each marked with its ``"candidate"`` name and ``"validation_kl"``, and ``"selection"`` saying
    what was compared. ``measure(solution)``: where solve checks speed, times a candidate the speed checks did
    not (the layer-dropping child) before it is put first (``hwopt.evaluate.measured_speedup``'s figures); one
    that measures short of ``--speedup`` on a quiet machine is left out."""
    s = run.settings
    mip = result["solutions"]
    candidates = {("mip" if i == 0 else f"mip_{i + 1}"): solution for i, solution in enumerate(mip)}
    dropped = layer_drop_entry(run, library, costs, mip[0]["totals"][RUNTIME])
    if dropped is not None:
        candidates[LAYER_DROP] = dropped
    if len(candidates) == 1:
        return result
    console.print(f"solve: {len(candidates)} candidate children ({', '.join(candidates)}), each given "
                  f"{s.select_tokens} tokens of GKD, then compared on validation English")
    for name, solution in candidates.items():
        solution["candidate"] = name
        solution["validation_kl"] = validation_kl(run, solution, coupled_dir)
        console.print(f"solve: {name}: validation KL {solution['validation_kl']:.4f} (predicted "
                      f"{solution['predicted_speedup']:.2f}x)")
    ranked = sorted(candidates.values(), key=lambda solution: solution["validation_kl"])
    if measure is not None and ranked[0] is dropped:
        dropped["speed_check"] = check = measure(dropped)
        short = check["measured_speedup"] < s.speedup and not check["disturbed"]
        console.print(f"solve: {LAYER_DROP} measures {check['measured_speedup']:.2f}x here"
                      + (f", short of {s.speedup:.2f}x: not kept" if short else ""))
        if short:
            ranked.remove(dropped)
    console.print(f"solve: keeping {ranked[0]['candidate']}")
    return {**result, "solutions": ranked,
            "selection": {"tokens": s.select_tokens, "text": "validation English (hwopt/heldout/"
                          "validation_english.txt)", "candidates": {name: solution["validation_kl"]
                                                                     for name, solution in candidates.items()}}}
