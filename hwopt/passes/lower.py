"""lower: the child in each requested output format (``lower/<format>/``).

Before anything is written, the child is checked against the runtime that
will serve it (``--runtime``): lower refuses a checkpoint that runtime would
fail on or misread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hwopt import plugins
from hwopt.errors import HwoptError
from hwopt.lowering.runtimes import Runtime, check_checkpoint
from hwopt.search_space import Scenario


@dataclass(frozen=True)
class LowerOptions:
    """What every format is told besides the model."""

    runtime: Runtime  # the runtime that will serve the child
    target: object = None  # the target engines are built for (None: this CPU)
    scenario: Scenario = field(default_factory=Scenario)  # its dtype is the weights' (fp8 lowers as bf16)
    model_name: str = "model"  # engines are named after it

    @property
    def dtype(self) -> str:
        return self.scenario.dtype


def lower(model, tokenizer, formats: list[str], out_dir: Path, options: LowerOptions) -> None:
    """Write ``model`` in each of ``formats`` under ``out_dir/<format>``; HwoptError if the runtime would misread it."""
    chosen = [plugins.formats().get(name) for name in formats]  # an unknown format fails before anything is written
    for fmt in chosen:
        if hasattr(fmt, "available") and not (found := fmt.available(options))[0]:
            raise HwoptError(f"cannot lower to {fmt.name} here: {found[1]}")
    check_checkpoint(options.runtime, model.block_configs, model.config)
    for fmt in chosen:
        fmt.lower(model, tokenizer, Path(out_dir) / fmt.name, options)
