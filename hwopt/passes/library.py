"""library: each parent layer's cheaper variants, trained by blockwise local distillation (BLD,
``hwopt.bld``); with ``--two-layer``, also blocks that replace two consecutive layers (``hwopt.two_layer``).

Imports torch only when it runs (see ``hwopt.passes.profile``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.pipeline import PassInfo
from hwopt.settings import DATA, PLACEMENT, SEARCH_SPACE

if TYPE_CHECKING:
    from hwopt.memory_plan import MemoryPlan
    from hwopt.run import Run


def check(run: Run) -> None:
    """The parent has weights; ``--two-layer`` needs no-op layers."""
    run.source.require_weights()
    if run.settings.two_layer and not run.settings.no_op:
        raise HwoptError("--two-layer leaves a no-op layer after each two-layer block: drop --no-noop")


def plan(run: Run) -> MemoryPlan:
    """One parent layer, its variants and their BLD batch at a time (``hwopt.memory_plan.library_plan``)."""
    from hwopt.bld import BLDSettings
    from hwopt.memory_plan import library_plan

    s = run.settings
    return library_plan(run.source.config, run.source.block_configs, run.space, s.bld_tokens, s.seq_len,
                        BLDSettings.batch_sequences, run.placement)


def call(run: Run, out: Path) -> None:
    """Every rank trains its share of the (layer, variant) units; rank 0 then the two-layer blocks."""
    from hwopt.bld import BLDSettings, Library, build_library
    from hwopt.two_layer import build_two_layer

    s = run.settings
    settings = BLDSettings(tokens=s.bld_tokens, lr=s.bld_lr, seed=s.seed)
    build_library(run.layerwise_parent, run.split.train_batches(s.bld_tokens), run.space, settings, out,
                  run.placement, run.ranks)
    if s.two_layer and run.ranks.is_main:
        build_two_layer(run.layerwise_parent, Library(out, run.layerwise_parent, placement=run.placement),
                        run.split.train_batches(s.bld_tokens), settings, run.output("library", "two_layer", out),
                        run.placement)


INFO = PassInfo("library", (*SEARCH_SPACE, *DATA, *PLACEMENT, "two_layer", "bld_tokens", "bld_lr"),  # the variants
                check, call, plan=plan, sharded=True,
                outputs={"two_layer": "two_layer"},  # with --two-layer, the blocks that replace two layers, trained
                also_reads=("max_memory",))
