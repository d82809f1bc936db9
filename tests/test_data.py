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
    # train is the start of the corpus, its sequences shuffled; held-out comes strictly after it: no token is in both
    cut = int(len(ids) * (1 - HELDOUT_FRACTION))
    assert n_train <= cut
    in_order = ids[:n_train].view(-1, seq_len)
    assert sorted(map(tuple, split.train.tolist())) == sorted(map(tuple, in_order.tolist()))
    assert not torch.equal(split.train, in_order)
    # so the first tenth of the training sequences come from all over the corpus, not its first topics
    first = {tuple(row) for row in split.train[: len(split.train) // 10].tolist()}
    positions = [i for i, row in enumerate(in_order.tolist()) if tuple(row) in first]
    assert min(positions) < len(in_order) // 5 and max(positions) > len(in_order) * 4 // 5
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
    assert "plain text file." in {bytes(row.tolist()).decode() for row in split.train}


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


def test_parent_samples_alternate_with_the_corpus_and_a_tenth_is_held_out():
    plain = load_split(None, TOK, 64)
    samples = torch.arange(20 * 64).view(20, 64) + 1000  # ids a byte tokenizer never makes
    split = load_split(None, TOK, 64, samples)
    assert torch.equal(split.heldout, plain.heldout)  # the run's own held-out text is the corpus's, as before
    assert torch.equal(split.samples_heldout, samples[-2:])
    assert torch.equal(split.train[0:36:2], plain.train[:18]) and torch.equal(split.train[1:36:2], samples[:18])
    assert torch.equal(split.train[36:], plain.train[18:])
    assert split.sha256 != plain.sha256 and "sampled from the parent" in split.source
    scoring = split.score_batches(64 * 4)
    assert torch.equal(scoring[1::2], samples[-2:]) and torch.equal(scoring[0::2], plain.heldout[:2])


def test_general_heldout_is_none_of_the_training_text():
    from hwopt.data import GENERAL_HELDOUT, general_heldout

    general = general_heldout(TOK, 64)
    assert general.shape[1] == 64 and general.numel() > 8000
    text = GENERAL_HELDOUT.read_text()
    corpus, _ = read_corpus(None)
    sentences = [s.strip() for s in re.split(r"[.!?]\s", text) if len(s.strip()) > 40]
    assert sentences and not any(s in corpus for s in sentences)


def test_a_draw_follows_the_next_token_distribution():
    """Inverse-CDF draws land on each token as often as its probability says, and never on one of probability 0."""
    from hwopt.data import draw

    logits = torch.tensor([[0.0, 1.0, -float("inf"), 2.0, 0.5]]).repeat(40000, 1)
    tokens = draw(logits, torch.Generator().manual_seed(0))
    assert tokens.shape == (40000, 1)
    frequencies = torch.bincount(tokens.flatten(), minlength=5) / 40000
    assert frequencies[2] == 0
    assert torch.allclose(frequencies, logits[0].softmax(-1), atol=0.01)  # 4 standard errors at most


def test_sampling_from_the_parent_is_seeded_and_cached(tiny_llama_dir, tmp_path):
    from hwopt.data import ParentSampling, cached_parent_samples, sample_from_parent
    from hwopt.model.layerwise import LayerwiseParent
    from hwopt.model_source import resolve_model
    from hwopt.plugins import block_types

    source = resolve_model(str(tiny_llama_dir))
    model, tokenizer = source.load(), source.tokenizer()
    a, b = (sample_from_parent(model, 1, 3, 5, seed=7, batch=2) for _ in range(2))
    assert a.shape == (3, 5) and torch.equal(a, b)
    layerwise = LayerwiseParent(tiny_llama_dir, block_types())  # read a layer at a time, at every token
    assert torch.equal(sample_from_parent(layerwise, 1, 3, 5, seed=7, batch=2), a)
    assert not torch.equal(a, sample_from_parent(model, 1, 3, 5, seed=8, batch=2))
    first = cached_parent_samples(lambda: model, tokenizer, "tiny", ParentSampling(40, 8, 0), tmp_path)
    assert first.shape == (6, 8)  # 5 sequences for 40 tokens, and one to hold out
    assert len(list((tmp_path / "parent-samples").glob("*.safetensors"))) == 1

    def not_loaded():
        raise AssertionError("the parent was loaded although its samples are in the cache")

    assert torch.equal(cached_parent_samples(not_loaded, tokenizer, "tiny", ParentSampling(40, 8, 0), tmp_path), first)
    cooler = cached_parent_samples(lambda: model, tokenizer, "tiny", ParentSampling(40, 8, 0, 0.5), tmp_path)
    assert len(list((tmp_path / "parent-samples").glob("*.safetensors"))) == 2  # a temperature of its own
    assert not torch.equal(cooler, first)


def test_a_runs_data_hash_is_its_splits_without_tokenizing_the_corpus(tiny_llama_dir, tmp_path, monkeypatch):
    import hwopt.run

    monkeypatch.setenv("HWOPT_CACHE", str(tmp_path / "cache"))
    run = hwopt.run.Run(tmp_path / "run", hwopt.run.Settings(model=str(tiny_llama_dir), distill_samples=64,
                                                               seq_len=16))
    with monkeypatch.context() as patched:
        patched.setattr(hwopt.run, "load_split", lambda *args: pytest.fail("the corpus was tokenized"))
        sha256 = run.data_sha256
    assert sha256 == run.split.sha256
    assert sha256 != load_split(None, run.tokenizer, 16).sha256  # the samples are in it
