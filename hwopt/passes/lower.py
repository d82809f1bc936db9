"""lower: the child in each requested output format (``lower/<format>/``).

Before anything is written, the child is checked against the runtime that
will serve it (``--runtime``): lower refuses a checkpoint that runtime would
fail on or misread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hwopt.lowering.runtimes import Runtime, check_checkpoint
from hwopt.plugins import lowerings


@dataclass(frozen=True)
class LowerOptions:
    """What every lowering is told besides the model."""

    runtime: Runtime  # the runtime that will serve the child
    dtype: str = "fp32"  # weights and activations: fp32, bf16, fp16 (fp8 lowers as bf16)
    target: str = "cpu"  # the hardware target's name (engines are built per target)


def lower(model, tokenizer, formats: list[str], out_dir: Path, options: LowerOptions) -> None:
    """Write ``model`` in each of ``formats`` under ``out_dir/<format>``; HwoptError if the runtime would misread it."""
    chosen = [lowerings().get(name) for name in formats]  # an unknown format fails before anything is written
    check_checkpoint(options.runtime, model.block_configs, model.config.hidden_size)
    for lowering in chosen:
        lowering.lower(model, tokenizer, Path(out_dir) / lowering.name, options)
