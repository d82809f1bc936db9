"""The corpus: where it comes from, how it is split, and the errors a user sees."""

from __future__ import annotations

import json
import re

import pytest
import torch

from hwopt.data import HELDOUT_FRACTION, load_split, read_corpus
from hwopt.errors import HwoptError


class ByteTokenizer:
    """A tokenizer-free stand-in: one token per UTF-8 byte."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}


TOK = ByteTokenizer()


def test_default_corpus_is_split_train_then_heldout():
    seq_len = 128
    split = load_split(None, TOK, seq_len)
    text, source = read_corpus(None)
    ids = torch.tensor(TOK(text)["input_ids"])
    assert "pydoc_data" in source and split.source == source
    assert split.train.shape[1] == split.heldout.shape[1] == seq_len
    assert len(split.train) > 100 and len(split.heldout) > 10
    n_train, n_held = split.train.numel(), split.heldout.numel()
    assert n_held / (n_train + n_held) == pytest.approx(HELDOUT_FRACTION, abs=0.005)
    # train is the start of the corpus, held-out comes strictly after it: no token is in both
    cut = int(len(ids) * (1 - HELDOUT_FRACTION))
    assert n_train <= cut
    assert torch.equal(split.train.reshape(-1), ids[:n_train])
    assert torch.equal(split.heldout.reshape(-1), ids[cut:cut + n_held])
    # deterministic: the same text gives the same split and hash
    again = load_split(None, TOK, seq_len)
    assert torch.equal(again.heldout, split.heldout) and again.sha256 == split.sha256


def test_batches_take_whole_sequences_and_cycle_when_short():
    split = load_split(None, TOK, 64)
    assert split.train_batches(640).shape == (10, 64)
    assert split.heldout_batches(10).shape == (1, 64)  # at least one sequence
    n = len(split.heldout)
    many = split.heldout_batches(64 * (n + 3))
    assert many.shape == (n + 3, 64) and torch.equal(many[n:], split.heldout[:3])


def test_text_and_jsonl_files_are_read(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("plain text file. " * 50)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "first record"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    text, source = read_corpus([str(txt), str(jsonl)])
    assert text.startswith("plain text file.")
    assert text.endswith("first record\n\nsecond")
    assert source == f"{txt}, {jsonl}"
    split = load_split([str(txt), str(jsonl)], TOK, 16)
    assert split.source == source
    assert bytes(split.train[0].tolist()).decode() == "plain text file."


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(HwoptError, match="nope.txt"):
        read_corpus([str(missing)])


def test_a_bad_jsonl_line_is_named_with_its_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"text": "ok too"}\nnot json\n')
    with pytest.raises(HwoptError, match=re.escape(f"{jsonl}:3:") + r" .*'text' field"):
        read_corpus([str(jsonl)])
    jsonl.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(HwoptError, match=re.escape(f"{jsonl}:2:")):
        read_corpus([str(jsonl)])
    jsonl.write_text('["a list"]\n')
    with pytest.raises(HwoptError, match=re.escape(f"{jsonl}:1:")):
        read_corpus([str(jsonl)])


def test_empty_or_too_short_corpus_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(HwoptError, match="hold no text"):
        read_corpus([str(empty)])
    short = tmp_path / "short.txt"
    short.write_text("x" * 500)
    with pytest.raises(HwoptError, match=r"too short for sequences of 128 tokens"):
        load_split([str(short)], TOK, 128)
    assert load_split([str(short)], TOK, 32).heldout.shape == (1, 32)
