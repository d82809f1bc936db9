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
and within the run's other budgets (``hwopt.baselines.layer_drop``),
``--select-tokens`` of GKD at the run's uptraining learning rate, measures
its KL from the parent on validation English (``hwopt.data.VALIDATION_ENGLISH``:
human prose nothing trains on), and puts the lowest first in
``solutions.json``; where solve times children, one the speed checks did not
time is timed before it is kept. The figures behind this are in README.md
("Which child solve keeps").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.baselines import REMOVED, block_influence, layer_drop
from hwopt.data import VALIDATION_ENGLISH
from hwopt.errors import HwoptError
from hwopt.progress import console
from hwopt.search_space import Scenario, block_variant_name
from hwopt.solving import RUNTIME, library_problem, maximizes, solution_blocks, solution_entry, with_budgets

if TYPE_CHECKING:
    from hwopt.memory_plan import MemoryPlan
    from hwopt.run import Run

LAYER_DROP = "layer_drop"
VALIDATION_TEXT = "/".join(VALIDATION_ENGLISH.parts[-3:])  # hwopt/heldout/validation_english.txt


def layer_drop_entry(run: Run, library: dict, costs: dict, budget_ms: float, parent_totals: dict[str, float]
                     ) -> tuple[dict | None, str]:
    """The layer-dropping child (``hwopt.baselines.layer_drop``, block influence on the scoring text) within
    ``budget_ms`` of predicted runtime and the run's other budgets (memory, parameters, ...), as ``solutions.json``
    holds a solution (its speedup over ``parent_totals``, solve's), and "" ; or None and why there is none: the
    library has no no-op blocks (``--no-noop``), or dropping whole layers cannot meet the budgets."""
    s = run.settings
    unconstrained = library_problem(library, costs, s.objective_key, maximizes(s.objective_key))
    if any(block_variant_name(*REMOVED) not in library[layer] for layer in unconstrained.layers):
        return None, "the library has no no-op blocks (--no-noop)"
    problem = with_budgets(unconstrained, s.budgets, Scenario.from_json(costs["scenario"]))

    def names(choice: list[tuple[str, str]]) -> dict[str, str]:
        return {layer: block_variant_name(*pair) for layer, pair in zip(problem.layers, choice, strict=True)}

    parent_choice = [tuple(library[layer][problem.parent[layer]][k] for k in ("attention", "ffn"))
                     for layer in problem.layers]
    influence = block_influence(run.parent, run.split.score_batches(s.score_tokens))
    try:
        choice, _ = layer_drop(parent_choice, influence, costs, budget_ms, REMOVED,
                               fits=lambda choice: problem.is_feasible(names(choice)))
    except HwoptError:
        return None, "dropping whole layers cannot meet the budgets"
    solution = problem.solution(names(choice), LAYER_DROP, "heuristic", math.inf, 0.0)
    return solution_entry(library, problem, parent_totals, solution), ""


def training_plan(run: Run, solution: dict) -> MemoryPlan:
    """The memory of distilling ``solution``'s child in this process, as uptrain would (``uptrain_plan``)."""
    from hwopt.memory_plan import uptrain_plan
    from hwopt.uptraining import UptrainSettings

    s, config = run.settings, run.source.config
    blocks = solution_blocks(solution, config, f"solution {solution['solver']}")
    plan = uptrain_plan(config, blocks, run.source.block_configs, UptrainSettings.batch_sequences * s.seq_len,
                        s.seq_len, run.placement, 1)
    plan.pass_name = "distilling a candidate child"
    plan.remedy = "more --max-memory, or --select-tokens 0 not to compare candidates"
    return plan


def validation_kl(run: Run, solution: dict, coupled_dir: Path | None) -> float:
    """KL(parent || child) per token on validation English of ``solution``'s child after ``--select-tokens`` of
    GKD (the first training tokens, the run's uptraining learning rate and seed)."""
    from hwopt.evaluate import compare_on_heldout
    from hwopt.uptraining import UptrainSettings, uptrain

    s = run.settings
    child = run.assemble(solution, coupled_dir)
    uptrain(child, run.parent, run.split.train_batches(s.select_tokens), run.split.score_batches(s.score_tokens),
            UptrainSettings(tokens=s.select_tokens, lr=s.uptrain_lr, seed=s.seed), run.placement,
            label=f"solve: candidate {solution['candidate']} (GKD)")
    return compare_on_heldout(child, run.deployed_parent, run.validation_english)["kl_div"]


def fits(run: Run, solutions: list[dict]) -> str | None:
    """Why distilling one of ``solutions``' children does not fit ``--max-memory`` or the GPU; None if all fit."""
    return next(filter(None, (training_plan(run, solution).over(run.settings.max_memory, run.device_memory)
                              for solution in solutions)), None)


def select(run: Run, result: dict, library: dict, costs: dict, coupled_dir: Path | None = None,
           measure: Callable[[dict], dict] | None = None) -> dict:
    """``result`` (``solve``'s) with the candidates (see the module docstring) in order of validation KL, the
    lowest first, each marked with its ``"candidate"`` name and ``"validation_kl"``, and ``"selection"`` saying
    what was compared and what was left out. Unchanged, with a line saying why, where there is nothing to compare
    or distilling a candidate does not fit the memory. ``measure(solution)``: where solve checks speed, times a
    candidate before it goes first unless the speed checks timed it already (the MIP's first solution;
    ``hwopt.evaluate.measured_speedup``'s figures): one that measures short of ``--speedup`` on a quiet machine is
    left out."""
    s = run.settings
    mip = result["solutions"]
    candidates = {("mip" if i == 0 else f"mip_{i + 1}"): solution for i, solution in enumerate(mip)}
    over = fits(run, mip)
    if over:
        console.print(f"[yellow]solve: candidates not compared, the MIP's child kept: {over}[/yellow]", soft_wrap=True)
        return result
    dropped, why_not = layer_drop_entry(run, library, costs, mip[0]["totals"][RUNTIME], result["parent"]["totals"])
    if dropped is not None and (over := fits(run, [dropped])):
        dropped, why_not = None, over
    if dropped is not None:
        candidates[LAYER_DROP] = dropped
    elif len(candidates) == 1:
        console.print(f"solve: no layer-dropping child to compare ({why_not}): the MIP's child kept", soft_wrap=True)
        return result
    console.print(f"solve: {len(candidates)} candidate children ({', '.join(candidates)}), each given "
                  f"{s.select_tokens} tokens of GKD, then compared on validation English")
    for name, solution in candidates.items():
        solution["candidate"] = name
        solution["validation_kl"] = validation_kl(run, solution, coupled_dir)
        console.print(f"solve: {name}: validation KL {solution['validation_kl']:.4f} (predicted "
                      f"{solution['predicted_speedup']:.2f}x)")
    ranked = sorted(candidates.values(), key=lambda solution: solution["validation_kl"])
    left_out = {}
    while measure is not None and ranked[0] is not mip[0]:
        best = ranked[0]
        best["speed_check"] = check = measure(best)
        measured = check["measured_speedup"]
        if measured >= s.speedup or check["disturbed"]:
            console.print(f"solve: {best['candidate']} measures {measured:.2f}x here" + (
                "" if measured >= s.speedup else " while other processes kept the cores busy: not trusted, so kept; "
                "run `hwopt solve` again on a quiet machine to check it"), soft_wrap=True)
            break
        left_out[best["candidate"]] = f"measured {measured:.2f}x here, short of {s.speedup:.2f}x"
        console.print(f"solve: {best['candidate']} {left_out[best['candidate']]}: left out")
        ranked.remove(best)
    console.print(f"solve: keeping {ranked[0]['candidate']}")
    kls = {name: solution["validation_kl"] for name, solution in candidates.items()}
    return {**result, "solutions": ranked, "selection": {"tokens": s.select_tokens,
                                                         "text": f"validation English ({VALIDATION_TEXT})",
                                                         "candidates": kls, "left_out": left_out}}
