"""The progress bars of the long steps."""

from __future__ import annotations

import io

from rich.console import Console

from hwopt import progress as progress_module


def test_work_beyond_the_total_moves_the_bar_end_out(monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr(progress_module, "console", Console(file=shown, width=120))
    with progress_module.progress("timing rounds", total=2) as advance:
        for _ in range(3):  # a round more than foreseen
            advance()
    assert "3/3" in shown.getvalue() and "3/2" not in shown.getvalue()
