"""profile: what every block variant costs on the target, in the run's scenario (``hwopt.profiling``).

Like every module of ``hwopt.passes`` it describes its pass (``INFO``) and
imports what does the work only when the pass runs: the command line reads
the description without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.pipeline import PassInfo
from hwopt.settings import SEARCH_SPACE

if TYPE_CHECKING:
    from hwopt.run import Run


def check(run: Run) -> None:
    """The measurement backend resolves for the target and scenario; ``--max-spread`` is a positive fraction."""
    from hwopt.profiling import choose_backend

    s = run.settings
    choose_backend(s.backend, run.target, run.scenario, s.require_measured)
    if s.max_spread is not None and not s.max_spread > 0:
        raise HwoptError(f"--max-spread must be a positive fraction (0.1 is 10%), not {s.max_spread:g}")


def call(run: Run, out: Path) -> list[str]:
    """Measure or estimate every variant's cost into ``costs.json``; returns the profile's failed self-checks."""
    from hwopt.profiling import print_checks, profile

    s = run.settings
    costs = profile(run.source, run.target, run.scenario, run.space, s.backend, s.repeats,
                    run.output("profile", "costs", out), s.require_measured, s.max_spread)
    print_checks(costs)
    return costs["checks"]["problems"]


INFO = PassInfo("profile", (*SEARCH_SPACE, "target", "scenario", "batch", "dtype", "kv_dtype", "backend",
                            "require_measured", "repeats", "max_spread", "threads"),
                check, call, outputs={"costs": "costs.json"})
