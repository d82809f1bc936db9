"""The pipeline's passes in the order they run, each described by its own module's ``INFO``
(``hwopt.pipeline.PassInfo``): profile -> library -> score -> solve -> uptrain -> lower.

The pass modules import what does their work only when they run, so the
command line reads these descriptions (to build each command's options and
help, and to check names) without importing torch.
"""

from __future__ import annotations

from hwopt.passes import library, lower, profile, score, solve, uptrain
from hwopt.pipeline import PASSES

PASS_INFO = {p.INFO.name: p.INFO for p in (profile, library, score, solve, uptrain, lower)}
assert tuple(PASS_INFO) == PASSES

RESOLVED = ("model", "target")  # every pass resolves the run's model and target before it starts


def upstream(name: str) -> list[str]:
    """Every pass whose outputs ``name`` reads, directly or through another pass, in pipeline order."""
    found = set(PASS_INFO[name].reads)
    for up in PASS_INFO[name].reads:
        found.update(upstream(up))
    return [p for p in PASSES if p in found]


def settings_read_by(command: str) -> set[str]:
    """The settings ``hwopt <command>`` reads: a pass's own, or every pass's for ``optimize``."""
    passes = PASSES if command == "optimize" else [command]
    return {k for p in passes for k in (*RESOLVED, *PASS_INFO[p].settings, *PASS_INFO[p].also_reads)}
