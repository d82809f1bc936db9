"""uptrain: the child solve chose, built from the library and trained to imitate the parent on the run's data
(``hwopt.uptraining``), saved as a nemotron-nas checkpoint.

Under torchrun it is data-parallel (DDP), or shards the child and its
teacher over the ranks (FSDP) when one rank cannot hold them. Imports torch
only when it runs (see ``hwopt.passes.profile``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.pipeline import PassInfo, atomic_write_json, output_hash
from hwopt.settings import DATA, PLACEMENT

if TYPE_CHECKING:
    from hwopt.memory_plan import MemoryPlan
    from hwopt.model.config import BlockConfig
    from hwopt.run import Run


def check(run: Run) -> None:
    """The parent has weights (the teacher, and the layers the child keeps)."""
    run.source.require_weights()


def solved_blocks(run: Run) -> list[BlockConfig] | None:
    """The blocks of the child solve chose (the first of ``solutions.json``); None before solve has run.

    Raises:
        HwoptError: a block in ``solutions.json`` that does not read as one.
    """
    from hwopt.solving import solution_blocks

    path = run.output("solve", "solutions")
    if not output_hash(run.dir("solve")) or not path.is_file():
        return None
    solution = run.read_json(path)["solutions"][0]
    return solution_blocks(solution, run.source.config, str(path)) if "blocks" in solution else None  # not in
    # those of older versions


def plan(run: Run, shards: int | None = None) -> MemoryPlan:
    """uptrain's plan per rank, sharded over ``shards`` ranks (default: as ``sharded`` chooses), for the child
    solve chose, or one the size of the parent (its upper bound) before solve has run."""
    from hwopt.memory_plan import uptrain_plan
    from hwopt.uptraining import UptrainSettings

    s, config, blocks = run.settings, run.source.config, run.source.block_configs
    shards = shards or (run.ranks.world if sharded(run) else 1)
    return uptrain_plan(config, solved_blocks(run) or blocks, blocks, UptrainSettings.batch_sequences * s.seq_len,
                        s.seq_len, run.placement, shards)


def sharded(run: Run) -> bool:
    """Whether uptrain shards the child and its teacher over the ranks with FSDP (``--uptrain-sharding``):
    ``fsdp``; ``auto`` when the DDP plan (the whole child on every rank) does not fit one rank, on its GPU or
    within ``--max-memory``; never in one process.

    Raises:
        HwoptError: a choice other than auto, ddp and fsdp.
    """
    choice = run.settings.uptrain_sharding
    if choice not in ("auto", "ddp", "fsdp"):
        raise HwoptError(f"--uptrain-sharding {choice!r}: choose auto, ddp or fsdp")
    if run.ranks.world == 1 or choice == "ddp":
        return False
    return choice == "fsdp" or plan(run, shards=1).over(run.settings.max_memory, run.device_memory) is not None


def call(run: Run, out: Path) -> None:
    """Train the child against the parent on every rank; rank 0 saves it and the held-out figures."""
    from hwopt.model.checkpoint import save_nemotron_nas
    from hwopt.progress import console
    from hwopt.uptraining import UptrainSettings, full_weights, sharded_models, uptrain

    s = run.settings
    solution = run.read_json(run.output("solve", "solutions"))["solutions"][0]
    if sharded(run):  # built on meta, each rank reading its shards a layer at a time: neither model whole anywhere
        child, parent = sharded_models(run.child(solution), run.layerwise_parent, run.placement, run.ranks)
    else:
        child, parent = run.assemble(solution), run.parent
    stats = uptrain(child, parent, run.split.train_batches(s.uptrain_tokens), run.split.score_batches(s.score_tokens),
                    UptrainSettings(tokens=s.uptrain_tokens, lr=s.uptrain_lr, seed=s.seed), run.placement, run.ranks)
    weights = full_weights(child)  # under FSDP a collective: rank 0 gets them whole
    if run.ranks.is_main:
        save_nemotron_nas(child, run.output("uptrain", "model", out), run.tokenizer, state=weights)
        atomic_write_json(run.output("uptrain", "stats", out), stats)
    console.print(f"uptrain: held-out KL {stats['heldout_kl_before']:.4f} -> {stats['heldout_kl_after']:.4f}"
                  + ("" if stats["kept_uptrained_weights"] else " (worse: kept the weights from before)"))


INFO = PassInfo("uptrain", (*DATA, *PLACEMENT, "uptrain_tokens", "uptrain_lr",
                            "score_tokens"),  # the held-out sequences of its keep-or-revert check
                check, call, plan=plan,
                sharded=True, reads=("library", "solve"), outputs={"model": "model", "stats": "uptrain.json"},
                also_reads=("max_memory", "uptrain_sharding"))  # DDP or FSDP: the same update
