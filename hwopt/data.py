"""Text for distillation and scoring: a corpus, tokenised, split once and for all.

``--data`` takes text files and JSONL files (one object per line with a
``text`` field). Without it, the corpus is the English documentation that
ships with Python itself (``pydoc_data.topics``), so every machine has it.
The last tenth of the tokens is held out for scoring and evaluation; the
split depends only on the text and the sequence length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hwopt.errors import HwoptError

HELDOUT_FRACTION = 0.1


def check_data_files(paths: list[str] | None) -> None:
    for p in paths or []:
        if not Path(p).is_file():
            raise HwoptError(f"data file {p} does not exist")


def read_corpus(paths: list[str] | None) -> tuple[str, str]:
    """The corpus text and a description of where it came from."""
    check_data_files(paths)
    if not paths:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics (Python's own documentation)"
    parts = []
    for p in paths:
        path = Path(p)
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError
                    parts.append(text)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise HwoptError(f"{p}:{n}: each JSONL line must be an object with a 'text' field") from None
        else:
            parts.append(path.read_text(errors="replace"))
    text = "\n\n".join(parts)
    if not text.strip():
        raise HwoptError(f"the data files {', '.join(paths)} hold no text")
    return text, ", ".join(paths)


@dataclass
class TokenSplit:
    train: torch.Tensor  # [sequences, seq_len] token ids
    heldout: torch.Tensor  # [sequences, seq_len]
    source: str
    sha256: str  # of the text, so passes can tell when the data changed

    def train_batches(self, tokens: int) -> torch.Tensor:
        """The first ``tokens`` worth of training sequences (cycled if the corpus is short)."""
        return _take(self.train, tokens, "training")

    def heldout_batches(self, tokens: int) -> torch.Tensor:
        return _take(self.heldout, tokens, "held-out")


def _take(seqs: torch.Tensor, tokens: int, what: str) -> torch.Tensor:
    n = max(1, tokens // seqs.shape[1])
    if n > len(seqs):
        reps = -(-n // len(seqs))
        seqs = seqs.repeat(reps, 1)
    return seqs[:n]


def load_split(paths: list[str] | None, tokenizer, seq_len: int) -> TokenSplit:
    text, source = read_corpus(paths)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    cut = int(len(ids) * (1 - HELDOUT_FRACTION))
    train, heldout = ids[:cut], ids[cut:]
    if len(heldout) < seq_len or len(train) < seq_len:
        raise HwoptError(f"the corpus ({len(ids)} tokens) is too short for sequences of {seq_len} tokens")
    as_seqs = lambda t: t[: len(t) // seq_len * seq_len].view(-1, seq_len)  # noqa: E731
    return TokenSplit(as_seqs(train), as_seqs(heldout), source, hashlib.sha256(text.encode()).hexdigest())
