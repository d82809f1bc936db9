"""A user's multiple-choice task (``--task-data``), to steer the search toward it.

Each line of the JSONL file is ``{"question": text, "choices": [text, ...],
"answer": index or the right choice's text}``. A model answers the way
lm-evaluation-harness scores multiple choice: each choice is read as the
continuation of the question, scored by the summed log-probability of its
tokens, and the highest score wins.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hwopt.errors import HwoptError

LINE_FORMAT = '{"question": text, "choices": [text, ...], "answer": index or choice text}'


@dataclass
class MultipleChoice:
    """The questions tokenised: one row per (question, choice), a question's rows consecutive."""

    ids: torch.Tensor  # [rows, length]: the question's tokens, then the choice's, then padding
    choice_mask: torch.Tensor  # [rows, length]: True on the choice's tokens
    num_choices: list[int]  # per question
    answers: torch.Tensor  # [questions]: index of the right choice
    sha256: str  # of the file, so the score pass reruns when it changes


def _parse_line(line: str, where: str) -> tuple[str, list[str], int]:
    try:
        item = json.loads(line)
        question, choices, answer = item["question"], item["choices"], item["answer"]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise HwoptError(f"{where}: each line must be {LINE_FORMAT}") from None
    if not (isinstance(question, str) and question.strip() and isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) and c.strip() for c in choices)):
        raise HwoptError(f"{where}: needs a non-empty question and at least two non-empty choices: {LINE_FORMAT}")
    if isinstance(answer, str) and answer in choices:
        return question, choices, choices.index(answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return question, choices, answer
    raise HwoptError(f"{where}: answer {answer!r} is neither one of the choices nor an index below {len(choices)}")


def read_task(path: str, tokenizer) -> MultipleChoice:
    """Parse and tokenise ``path``; any problem is one ``HwoptError`` naming the file and line."""
    file = Path(path)
    if not file.is_file():
        raise HwoptError(f"task data file {path} does not exist")
    raw = file.read_bytes()
    rows, masks, num_choices, answers = [], [], [], []
    for n, line in enumerate(raw.decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        question, choices, answer = _parse_line(line, f"{path}:{n}")
        question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        joiner = "" if question[-1].isspace() else " "
        for choice in choices:
            choice_ids = tokenizer(joiner + choice, add_special_tokens=False)["input_ids"]
            rows.append(question_ids + choice_ids)
            masks.append([False] * len(question_ids) + [True] * len(choice_ids))
        num_choices.append(len(choices))
        answers.append(answer)
    if not rows:
        raise HwoptError(f"task data file {path} holds no questions ({LINE_FORMAT} per line)")
    length = max(map(len, rows))
    # Right padding: a causal model's outputs at the real tokens never see the padding after them.
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    choice_mask = torch.tensor([m + [False] * (length - len(m)) for m in masks])
    return MultipleChoice(ids, choice_mask, num_choices, torch.tensor(answers), hashlib.sha256(raw).hexdigest())


def choice_loglikelihoods(model: Callable[[torch.Tensor], torch.Tensor], task: MultipleChoice,
                          batch: int = 16) -> torch.Tensor:
    """Per row, the summed log-probability of the choice's tokens given what precedes them.

    ``model`` maps token ids to logits. Rows go through it ``batch`` at a time,
    always in the same batches, so that a caller caching per input can.
    """
    scores = []
    for ids, mask in zip(task.ids.split(batch), task.choice_mask.split(batch), strict=True):
        logits = model(ids)[:, :-1].float()
        token_logprobs = -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        scores.append((token_logprobs * mask[:, 1:]).sum(-1))
    return torch.cat(scores)


def task_accuracy(model: Callable[[torch.Tensor], torch.Tensor], task: MultipleChoice) -> float:
    """Fraction of questions whose right choice has the highest log-likelihood."""
    per_question = choice_loglikelihoods(model, task).split(task.num_choices)
    predicted = torch.stack([scores.argmax() for scores in per_question])
    return (predicted == task.answers).float().mean().item()
