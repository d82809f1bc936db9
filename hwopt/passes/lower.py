"""lower: the child in each requested output format (``lower/<format>/``).

Before anything is written, the child is checked against the runtime that
will serve it (``--runtime``): lower refuses a checkpoint that runtime would
fail on or misread. ``LowerOptions`` is what every format plugin is told
(``hookspecs.hwopt_register_formats``). The child is read a piece at a time
where every format asked for streams (the nemotron-nas checkpoint), else whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.lowering.runtimes import Runtime, check_checkpoint
from hwopt.pipeline import PassInfo
from hwopt.search_space import Scenario
from hwopt.settings import PLACEMENT

if TYPE_CHECKING:
    from hwopt.run import Run


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
    from hwopt import plugins

    chosen = [plugins.formats().get(name) for name in formats]  # an unknown format fails before anything is written
    for fmt in chosen:
        if hasattr(fmt, "available") and not (found := fmt.available(options))[0]:
            raise HwoptError(f"cannot lower to {fmt.name} here: {found[1]}")
    check_checkpoint(options.runtime, model.block_configs, model.config)
    for fmt in chosen:
        fmt.lower(model, tokenizer, Path(out_dir) / fmt.name, options)


def check(run: Run) -> None:
    """The parent has weights (its tokenizer is written beside the child)."""
    run.source.require_weights()


def call(run: Run, out: Path) -> None:
    """The uptrained child in each of ``--format``'s formats: read a piece at a time where every one of them
    streams (``Format.streams``: the nemotron-nas checkpoint), else loaded whole (ONNX and engines trace it)."""
    from hwopt import plugins
    from hwopt.model.checkpoint import load_checkpoint
    from hwopt.model.layerwise import LayerwiseParent

    options = LowerOptions(run.runtime, run.target, run.scenario, run.source.label)
    path, block_types = run.output("uptrain", "model"), plugins.block_types()
    streamed = all(getattr(plugins.formats().get(name), "streams", False) for name in run.settings.formats)
    child = LayerwiseParent(path, block_types) if streamed else load_checkpoint(path, block_types)
    lower(child, run.tokenizer, run.settings.formats, out, options)


INFO = PassInfo("lower", ("formats", "runtime", "dtype"), check, call, reads=("uptrain",),  # a folder per format
                also_reads=("scenario", "batch", "kv_dtype", *PLACEMENT))  # what the child is built for; the report
