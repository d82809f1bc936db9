"""lower: the child in each requested output format (``lower/<format>/``)."""

from __future__ import annotations

from pathlib import Path

from hwopt.plugins import lowerings


def lower(model, tokenizer, formats: list[str], out_dir: Path) -> None:
    for name in formats:
        lowerings().get(name).lower(model, tokenizer, Path(out_dir) / name)
