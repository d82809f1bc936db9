"""score: replace-1-block scores of every library variant (``hwopt.scoring``), joined with the profile's costs
into ``block_library.json``, the table solve reads.

The metrics do not depend on the costs, so they are kept as units of work
(``hwopt.pipeline.kept_units``) that outlive a new profile: a changed
profile redoes the join alone. Imports torch only when it runs (see
``hwopt.passes.profile``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.pipeline import PassInfo, atomic_write_json
from hwopt.settings import DATA, PLACEMENT

if TYPE_CHECKING:
    from hwopt.memory_plan import MemoryPlan
    from hwopt.run import Run


def check(run: Run) -> None:
    """The parent has weights, ``--score-pairs`` is known, and a metric that needs task data has it."""
    from hwopt.scoring import SCORE_PAIRS

    s = run.settings
    run.source.require_weights()
    if s.score_pairs not in SCORE_PAIRS:
        raise HwoptError(f"--score-pairs {s.score_pairs!r}: choose {' or '.join(SCORE_PAIRS)}")
    needing = [m.name for m in run.metric_objects if "task" in getattr(m, "needs", ())]
    if needing and not s.task_data:
        raise HwoptError(f"metric {', '.join(needing)} needs --task-data FILE.jsonl (multiple-choice questions, one "
                         "per line)")
    _ = run.task


def memory(run: Run) -> tuple[MemoryPlan, int]:
    """score's memory plan per rank, and the bytes of carried hidden states it leaves room for."""
    from hwopt.bld import variants_for_layer
    from hwopt.memory_plan import score_plan
    from hwopt.scoring import pairs_to_run

    s, config, blocks = run.settings, run.source.config, run.source.block_configs
    forwards = sum(len(pairs_to_run([v.name for v in layer["attention"]], [v.name for v in layer["ffn"]],
                                    s.score_pairs)) - 1  # rank 0's layers: the most of any rank
                   for layer in (variants_for_layer(config, b, run.space) for b in blocks[::run.ranks.world]))
    return score_plan(config, blocks, s.score_tokens, s.seq_len, forwards, run.placement, s.max_memory,
                      run.device_memory)


def call(run: Run, out: Path) -> None:
    """Metrics into units every rank shares out, then (rank 0) the two-layer blocks' and the costs joined in."""
    from hwopt.bld import Library
    from hwopt.scoring import score_metrics, with_costs
    from hwopt.two_layer import add_two_layer_entries

    s = run.settings
    units, heldout = run.kept_units("score"), run.split.score_batches(s.score_tokens)
    scored = score_metrics(run.layerwise_parent, run.library(coupled=False), heldout, run.metric_objects, units,
                           run.task, s.score_pairs, run.ranks, memory(run)[1])
    if not run.ranks.is_main:
        return
    if s.two_layer:
        with_two_layer = units / "two_layer.json"
        if not with_two_layer.is_file():
            two_layer = Library(run.dir("library"), run.layerwise_parent, run.output("library", "two_layer"),
                                run.placement)
            atomic_write_json(with_two_layer, add_two_layer_entries(run.layerwise_parent, two_layer, scored,
                                                                    heldout, run.metric_objects, run.task))
        scored = run.read_json(with_two_layer)
    atomic_write_json(run.output("score", "block_library", out),
                      with_costs(scored, run.read_json(run.output("profile", "costs"))))


INFO = PassInfo("score", (*DATA, *PLACEMENT, "two_layer", "score_tokens", "score_pairs", "metrics", "task_data"),
                check, call, plan=lambda run: memory(run)[0], sharded=True,
                reads=("library", "profile"), outputs={"block_library": "block_library.json"},
                also_reads=("max_memory",),  # the waves of carried hidden states: the same scores in any number
                joins=("profile",))  # the costs: the metrics do not depend on them
