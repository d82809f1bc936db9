"""Text for distillation, scoring and evaluation, tokenised and split once and for all.

Three sources, kept apart:

- the corpus: ``--data`` text files and JSONL files (one object per line with
  a ``text`` field); without it, the English documentation that ships with
  Python itself (``pydoc_data.topics``), so every machine has it. Its last
  tenth is held out: "the run's own held-out text".
- text sampled from the parent itself (data-free distillation, as in
  GKD, Agarwal et al. 2024, arXiv 2306.13649): ancestral sampling at
  temperature 1 from the start-of-text token, so the child is taught the
  parent's behaviour on text at large, not only on the corpus's domain.
  Training alternates corpus and sample sequences 1:1 while samples last;
  a tenth of the samples is held out and joins the scoring set.
- general English (``hwopt/heldout/general_english.txt``): prose on
  everyday subjects (baking, a lighthouse's history, rivers, language
  learning, a dialogue, a council meeting, sleep, birds, a market, saving
  money), written for hwopt and not drawn from any public corpus. No pass
  trains or scores on it; it only measures how the child does on text that
  is neither the corpus's domain nor anything it was distilled on.
- validation English (``hwopt/heldout/validation_english.txt``): more such
  prose on other subjects (a night train, an allotment, a letter, mending a
  puncture, a town library, a doctor's visit, a football match, moving
  house, clouds), also written for hwopt. Nothing trains on it either; solve
  picks among candidate children by it (``hwopt.selection``), so the
  general English above stays a text no choice was made on.

The corpus's training sequences are shuffled (a fixed seed), so that the first N tokens a pass takes (BLD takes
16K of the default corpus's 100K) are a sample of the whole corpus, not its first topics in alphabetical order.
The split depends only on the texts, the samples and the sequence length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hwopt.errors import HwoptError

HELDOUT_FRACTION = 0.1
GENERAL_HELDOUT = Path(__file__).parent / "heldout" / "general_english.txt"
VALIDATION_ENGLISH = Path(__file__).parent / "heldout" / "validation_english.txt"


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
    train: torch.Tensor  # [sequences, seq_len] token ids: corpus and parent samples, alternating
    heldout: torch.Tensor  # [sequences, seq_len]: the corpus's held-out tenth ("the run's own held-out text")
    source: str
    sha256: str  # of the texts and samples, so passes can tell when the data changed
    samples_heldout: torch.Tensor | None = None  # [sequences, seq_len]: held-out parent samples

    def train_batches(self, tokens: int) -> torch.Tensor:
        """The first ``tokens`` worth of training sequences (cycled if the corpus is short)."""
        return _take(self.train, tokens)

    def heldout_batches(self, tokens: int) -> torch.Tensor:
        """``tokens`` worth of the corpus's held-out sequences (report and ``hwopt evaluate``)."""
        return _take(self.heldout, tokens)

    def score_batches(self, tokens: int) -> torch.Tensor:
        """Held-out sequences for scoring and for uptraining's keep-or-revert check: corpus and samples alternating."""
        mixed = self.heldout if self.samples_heldout is None else alternate(self.heldout, self.samples_heldout)
        return _take(mixed, tokens)


def _take(seqs: torch.Tensor, tokens: int) -> torch.Tensor:
    n = max(1, tokens // seqs.shape[1])
    if n > len(seqs):
        reps = -(-n // len(seqs))
        seqs = seqs.repeat(reps, 1)
    return seqs[:n]


def alternate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` and ``b`` taken in turn while both last, then the rest of the longer one."""
    n = min(len(a), len(b))
    return torch.cat([torch.stack([a[:n], b[:n]], 1).flatten(0, 1), a[n:], b[n:]])


def _as_sequences(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    return ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)


def load_split(paths: list[str] | None, tokenizer, seq_len: int, samples: torch.Tensor | None = None) -> TokenSplit:
    """The corpus split into training and held-out sequences, with ``samples`` ([sequences, seq_len]) mixed in."""
    text, source = read_corpus(paths)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    cut = int(len(ids) * (1 - HELDOUT_FRACTION))
    train, heldout = ids[:cut], ids[cut:]
    if len(heldout) < seq_len or len(train) < seq_len:
        raise HwoptError(f"the corpus ({len(ids)} tokens) is too short for sequences of {seq_len} tokens")
    train, heldout = _as_sequences(train, seq_len), _as_sequences(heldout, seq_len)
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]  # [sequences, seq_len]
    if samples is None or not len(samples):
        return TokenSplit(train, heldout, source, data_sha256(text, samples))
    n_heldout = max(1, len(samples) // 10)
    return TokenSplit(alternate(train, samples[:-n_heldout]), heldout,
                      f"{source} + {len(samples) * samples.shape[1]} tokens sampled from the parent",
                      data_sha256(text, samples), samples[-n_heldout:])


def data_sha256(text: str, samples: torch.Tensor | None) -> str:
    """sha256 of the corpus ``text`` and the parent's ``samples`` (``TokenSplit.sha256``): what a pass's fingerprint
    reads of its data, known without tokenizing the corpus."""
    digest = hashlib.sha256(text.encode())
    if samples is not None and len(samples):
        digest.update(samples.numpy().tobytes())
    return digest.hexdigest()


def general_heldout(tokenizer, seq_len: int, path: Path = GENERAL_HELDOUT) -> torch.Tensor:
    """General English no pass trains on (see the module docstring), as [sequences, seq_len] token ids; ``path``
    another such text (``VALIDATION_ENGLISH``)."""
    ids = torch.tensor(tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(ids) < seq_len:
        raise HwoptError(f"{path} ({len(ids)} tokens) is too short for sequences of {seq_len} tokens")
    return _as_sequences(ids, seq_len)


# sequences drawn from the parent at once: on 2 CPU cores, 128 draws about 1.25x the tokens/s of 32 (small
# matrices); the samples depend on it (the draws are batched), so it is part of their cache key
SAMPLING_BATCH = 128
# how a token is drawn from the next-token distribution; part of the samples' cache key
SAMPLER = "inverse-cdf"


def draw(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], drawn from softmax(logits / ``temperature``): [rows, 1]
    token ids.

    Inverse-CDF sampling: one uniform number per row (from ``generator``, on the CPU, so the draws do not depend on
    the device), looked up in the row's cumulative probabilities. It draws from the same distribution as
    ``torch.multinomial``, which spends an exponential random number on every vocabulary entry (49,152 per token
    for SmolLM2: 39% of the sampling's time on 2 CPU cores).
    """
    cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)  # [rows, vocab]
    u = torch.rand(len(cdf), 1, generator=generator).to(cdf.device) * cdf[:, -1:]  # [rows, 1], in [0, total mass)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # first entry whose cdf > u


def next_token_logits(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """The logits [batch, vocab] of the token after ``tokens`` [batch, new], which extend ``cache`` (a
    ``KVCache``).

    ``model`` is a ``HeteroLlamaForCausalLM`` or a ``LayerwiseParent``: this goes through the pieces both offer,
    so a parent larger than memory is read a layer at a time, once per generated token.
    """
    x = model.embedding()(tokens)  # [batch, new, hidden]
    position_embeddings = model.position_embeddings(x, cache.length)
    for i in range(model.num_layers):
        x = model.decoder_layer(i)(x, position_embeddings, cache, i)
    cache.length += tokens.shape[1]
    norm, head = model.output_head()
    return head(norm(x[:, -1]))  # [batch, vocab]


@torch.inference_mode()
def sample_from_parent(model, start_token: int, sequences: int, seq_len: int, seed: int, temperature: float = 1.0,
                       batch: int = SAMPLING_BATCH) -> torch.Tensor:
    """``sequences`` x ``seq_len`` token ids drawn from ``model`` (whole, or a ``LayerwiseParent`` read a layer at
    a time) at ``temperature``, each after ``start_token``: [sequences, seq_len], on the CPU.

    Ancestral sampling with the KV cache: one forward per token per batch. The start token itself is not kept.
    """
    from hwopt.model.modeling import PreallocatedKVCache
    from hwopt.progress import progress

    generator = torch.Generator().manual_seed(seed)
    rows = []
    with progress("sample from the parent", total=sequences * seq_len) as advance:
        for n in range(0, sequences, batch):
            tokens = torch.full((min(batch, sequences - n), 1), start_token, device=model.device)
            cache = PreallocatedKVCache(model.num_layers, capacity=1 + seq_len)
            drawn = []
            for _ in range(seq_len):
                tokens = draw(next_token_logits(model, tokens, cache), generator, temperature)  # [batch, 1]
                drawn.append(tokens)
                advance(len(tokens))
            rows.append(torch.cat(drawn, 1).cpu())
    return torch.cat(rows)


@dataclass(frozen=True)
class ParentSampling:
    """What ``--distill-samples`` draws from the parent: ``tokens`` (and a tenth more to hold out) in sequences of
    ``seq_len``, from ``seed``, at ``temperature``."""

    tokens: int
    seq_len: int
    seed: int
    temperature: float = 1.0


def parent_samples_file(tokenizer, weights_id: str, sampling: ParentSampling, cache_dir: Path
                        ) -> tuple[Path, int, int]:
    """Where ``cached_parent_samples`` keeps these samples, the sequences it draws (``sampling.tokens`` and a tenth
    more to hold out) and the token each starts after."""
    sequences = -(-sampling.tokens // sampling.seq_len)
    sequences += max(1, sequences // 9)  # the held-out tenth
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    key = hashlib.sha256(json.dumps([weights_id, sequences, sampling.seq_len, sampling.seed, sampling.temperature,
                                     start, SAMPLING_BATCH, SAMPLER]).encode()).hexdigest()[:16]
    return Path(cache_dir) / "parent-samples" / f"{key}.safetensors", sequences, start


def cached_parent_samples(load_model: Callable[[], torch.nn.Module], tokenizer, weights_id: str,
                          sampling: ParentSampling, cache_dir: Path) -> torch.Tensor:
    """``sampling``'s tokens (plus a tenth to hold out) drawn from the parent, kept in ``cache_dir`` across runs.

    ``load_model`` gives the parent, called only when the samples are not in the cache. ``weights_id`` names the
    parent's weights (the cache key, with the other arguments). Written atomically.
    """
    from safetensors.torch import load_file, save_file

    from hwopt.pipeline import atomic_path

    path, sequences, start = parent_samples_file(tokenizer, weights_id, sampling, cache_dir)
    if path.is_file():
        return load_file(path)["ids"]
    ids = sample_from_parent(load_model(), start, sequences, sampling.seq_len, sampling.seed, sampling.temperature)
    with atomic_path(path) as tmp:
        save_file({"ids": ids.contiguous()}, tmp)
    return ids
