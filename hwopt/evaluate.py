"""A child against its parent: quality on held-out text and a task, speed and memory measured here.

``compare_on_heldout`` is one forward of each model per batch: KL(parent ||
child) per token, both perplexities, and how often the child's top token is
the parent's. ``compare_layerwise`` gives the same figures holding one
decoder layer at a time, for models that do not fit in memory together.
``measure_runtimes`` times whole generations, runs
interleaved so that drift on a shared machine affects both alike;
``measured_speedup`` pairs them round by round and times until the ratio
is precise enough.
``evaluate`` is ``hwopt evaluate``: every figure on every text set given,
plus runtime, tokens/s and memory in one serving scenario (no runtime for
models compared a layer at a time).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from hwopt.metric import kl_divergence
from hwopt.model.checkpoint import meta_model
from hwopt.model.modeling import HeteroLlamaForCausalLM, greedy_tokens
from hwopt.model.modeling_nemotron_nas import GroupedQueryAttention
from hwopt.progress import progress
from hwopt.scoring import swapped_final_hidden
from hwopt.search_space import Scenario
from hwopt.tasks import MultipleChoice, task_accuracy
from hwopt.timing import CpuLoad, Timer, interleaved_rounds, median_error, oversubscribed
from hwopt.workload import MIB

COMPARISON_BATCH = 4  # held-out sequences whose logits a comparison holds at once
SPEEDUP_PRECISION = 0.02  # the measured speedup's relative standard error that timing aims at (``measured_speedup``)
MIN_SPEEDUP_ROUNDS = 5  # rounds before that error is trusted: a report at 3 rounds said ± 1%, then measured 7% off


def _next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()


def _comparison(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], ids: torch.Tensor
                ) -> dict[str, float]:
    """``compare_on_heldout``'s figures on ``ids`` [sequences, tokens] from its batches in order: (rows [batch,
    tokens], the child's logits, the parent's logits [batch, tokens, vocab])."""
    kl = child_loss = parent_loss = agree = 0.0
    for rows, student, teacher in batches:
        kl += kl_divergence(student.flatten(0, 1), teacher.flatten(0, 1)).item() * len(rows)
        child_loss += _next_token_loss_sum(student, rows)
        parent_loss += _next_token_loss_sum(teacher, rows)
        agree += (student.argmax(-1) == teacher.argmax(-1)).float().sum().item()
    predicted = ids.shape[0] * (ids.shape[1] - 1)
    return {"kl_div": kl / len(ids), "perplexity": math.exp(child_loss / predicted),
            "parent_perplexity": math.exp(parent_loss / predicted), "top1_agreement": agree / ids.numel()}


@torch.no_grad()
def compare_on_heldout(child, parent, ids: torch.Tensor, batch: int = COMPARISON_BATCH) -> dict[str, float]:
    """On ``ids`` ([sequences, tokens]): KL(parent || child) per token (nats), the perplexity of each model
    (exp of the mean next-token cross-entropy), and top-1 agreement (fraction of positions where the child's
    most likely next token is the parent's). Both models whole, ``batch`` sequences at a time."""
    device = next(child.parameters()).device
    return _comparison(((rows, child(rows).logits, parent(rows).logits) for rows in torch.split(ids.to(device), batch)),
                       ids)


@torch.no_grad()
def compare_layerwise(child, parent, ids: torch.Tensor, batch: int = COMPARISON_BATCH) -> dict[str, float]:
    """``compare_on_heldout``'s figures (the same keys and definitions) with at most one decoder layer of either
    model in memory: ``child`` and ``parent`` are anything ``hwopt.scoring.swapped_final_hidden`` streams (a
    ``LayerwiseParent`` reads each layer from disk when asked; a whole model works too, on the same device).

    Each model's layers run in order over all the sequences of ``ids`` [sequences, tokens], the child's first,
    carrying their hidden states [sequences, tokens, hidden]; then the logits [batch, tokens, vocab] of both come
    from those final states ``batch`` sequences at a time, never those of all sequences at once. Peak: one layer,
    its forward over all the sequences, both final norms and LM heads, two final states and one batch's logits.
    """
    child_final, parent_final = (swapped_final_hidden(model, ids) for model in (child, parent))
    (child_norm, child_head), (parent_norm, parent_head) = child.output_head(), parent.output_head()
    batches = zip(torch.split(ids.to(child.device), batch), child_final.split(batch), parent_final.split(batch))
    return _comparison(((rows, child_head(child_norm(c)), parent_head(parent_norm(p))) for rows, c, p in batches),
                       ids)


def generation_timers(models: dict[str, HeteroLlamaForCausalLM], scenario: Scenario, vocab_size: int
                      ) -> dict[str, Timer]:
    """Per model, a timer of one full greedy generation (``scenario``'s batch, input and output lengths, the same
    random prompts for all): wall-clock ms, as a one-phase round of ``hwopt.timing.interleaved_rounds``. Each
    model has generated once (a warm-up) when this returns."""
    torch.manual_seed(0)
    device = next(next(iter(models.values())).parameters()).device
    prompts = torch.randint(0, vocab_size, (scenario.batch, scenario.input_len)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for model in models.values():
        greedy_tokens(model, prompts, 2)

    def timer(model: HeteroLlamaForCausalLM) -> Timer:
        def one_generation() -> list[float]:
            sync()
            start = time.perf_counter()
            greedy_tokens(model, prompts, scenario.output_len)
            sync()
            return [(time.perf_counter() - start) * 1e3]
        return one_generation
    return {name: timer(model) for name, model in models.items()}


def runtime_rounds(models: dict[str, HeteroLlamaForCausalLM], scenario: Scenario, vocab_size: int,
                   repeats: int = 3, noisy: Callable[[dict], list] = lambda _: [], extra_time_factor: float = 1.0
                   ) -> dict[str, list[float]]:
    """Wall-clock ms of each model's full greedy generations (``generation_timers``), runs interleaved: ``repeats``
    rounds, then more while ``noisy(rounds)`` names a model, for at most ``extra_time_factor`` times as long as
    the first rounds took (``hwopt.timing.interleaved_rounds``). A bar counts the rounds: on a busy machine they
    can take minutes."""
    with progress(f"time {' and '.join(models)} whole (rounds)", total=repeats) as advance:
        rounds = interleaved_rounds(generation_timers(models, scenario, vocab_size), repeats, noisy,
                                    extra_time_factor, after_round=advance)
    return {name: [ms for ms, in phases] for name, phases in rounds.items()}


def measure_runtimes(models: dict[str, HeteroLlamaForCausalLM], scenario: Scenario, vocab_size: int,
                     repeats: int = 3) -> dict[str, float]:
    """Median wall-clock ms of each model's generations in ``runtime_rounds``."""
    return {name: statistics.median(t) for name, t in runtime_rounds(models, scenario, vocab_size, repeats).items()}


def round_speedups(parent_ms: list[float], child_ms: list[float]) -> list[float]:
    """Each round's parent ms over the child's: the two generations timed back to back."""
    return [p / c for p, c in zip(parent_ms, child_ms)]


def measured_speedup(parent: HeteroLlamaForCausalLM, child: HeteroLlamaForCausalLM, scenario: Scenario,
                     repeats: int = 5, precision: float = SPEEDUP_PRECISION) -> dict:
    """The child's speedup measured here, paired: the median over rounds of the parent's generation ms over the
    child's in the same round (``runtime_rounds``; ``round_speedups``), and its relative standard error ``error``
    (``hwopt.timing.median_error`` of those ratios). Pairing matters on a shared machine: here a generation's
    time drifted by 25% over a minute while the two models' times moved together, so a ratio of the two medians
    taken over all rounds scatters more than the ratio within a round. After ``repeats`` rounds, more are timed
    while there are fewer than ``MIN_SPEEDUP_ROUNDS`` (fewer ratios say little of their own scatter) or ``error``
    exceeds ``precision``, for at most as long again (``runtime_rounds``).
    ``others``: how many of this process's cores other processes kept busy meanwhile, and ``disturbed``: whether
    they and torch's threads did not fit on them (``hwopt.timing.oversubscribed``), in which case the ratio says
    more about the load than about the child. Returns ``{"measured_speedup", "error", "rounds",
    "measured_ms": {"parent", "child"} (medians)}``, ``"others"`` and ``"disturbed"``."""
    def imprecise(rounds: dict) -> list[str]:
        speedups = round_speedups(*([ms for ms, in rounds[name]] for name in ("parent", "child")))
        return ["child"] if len(speedups) < MIN_SPEEDUP_ROUNDS or median_error(speedups) > precision else []

    with CpuLoad() as load:
        rounds = runtime_rounds({"parent": parent, "child": child}, scenario, parent.config.vocab_size, repeats,
                                imprecise)
    speedups = round_speedups(rounds["parent"], rounds["child"])
    return {"measured_speedup": statistics.median(speedups), "error": median_error(speedups), "rounds": len(speedups),
            "measured_ms": {name: statistics.median(t) for name, t in rounds.items()}, "others": load.others,
            "disturbed": oversubscribed(load.others, torch.get_num_threads(), len(load.cores))}


def memory_mib(model: HeteroLlamaForCausalLM, scenario: Scenario) -> dict[str, float]:
    """Weights as loaded, and the KV cache its attention layers hold at the scenario's longest context (MiB)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = scenario.batch * (scenario.input_len + scenario.output_len)
    dtype_bytes = next(model.parameters()).element_size()
    kv = sum(2 * layer.self_attn.num_kv_heads * layer.self_attn.head_dim * tokens * dtype_bytes
             for layer in model.model.layers if isinstance(layer.self_attn, GroupedQueryAttention))
    return {"weights_mib": weights / MIB, "kv_cache_mib": kv / MIB, "memory_mib": (weights + kv) / MIB}


def task_logits_layerwise(model, task: MultipleChoice) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s logits on rows of ``task.ids``, its layers streamed once over all of them
    (``swapped_final_hidden``): token ids [rows, tokens], each a row of ``task.ids`` -> logits [rows, tokens,
    vocab], computed from the kept final states when asked (what ``hwopt.tasks.task_accuracy`` calls)."""
    final = swapped_final_hidden(model, task.ids)  # [task rows, tokens, hidden]
    row_of = {tuple(row.tolist()): n for n, row in enumerate(task.ids)}
    norm, head = model.output_head()
    return lambda ids: head(norm(final[[row_of[tuple(row.tolist())] for row in ids]]))


def evaluate(child, parent, texts: dict[str, torch.Tensor], scenario: Scenario, task: MultipleChoice | None = None,
             repeats: int = 3, not_measured: str | None = None) -> dict:
    """Every figure of ``hwopt evaluate``: per text set (name -> [sequences, tokens] ids) the comparison of
    ``compare_on_heldout``; task accuracy of each model when ``task`` is given; per model its parameters, memory
    (MiB), the measured generation ms and tokens/s (batch x (input + output) / runtime); the measured speedup.

    ``measured_error``: the measured speedup's relative standard error; ``measured_while_disturbed``: other
    processes' load did not leave the timing its cores (``measured_speedup``).

    ``not_measured``: why the models are not whole (the report says it, as ``runtime_not_measured``). ``child``
    and ``parent`` are then ``LayerwiseParent``s, compared a layer at a time (``compare_layerwise``, and
    ``task_logits_layerwise``), and nothing is timed: parameters and memory come from their architecture."""
    whole = not_measured is None
    result = {"scenario": scenario.to_json(), "texts": {}}
    for name, ids in texts.items():
        compared = (compare_on_heldout if whole else compare_layerwise)(child, parent, ids)
        result["texts"][name] = {"tokens": ids.numel(), **compared}
    if whole:
        timing = measured_speedup(parent, child, scenario, repeats)
        ms = timing["measured_ms"]
        result.update(measured_speedup=timing["measured_speedup"], measured_error=timing["error"],
                      measured_while_disturbed=timing["disturbed"])
    else:
        result["runtime_not_measured"] = not_measured
    for role, model in (("parent", parent), ("child", child)):
        built = model if whole else meta_model(model).to(model.dtype)  # figures without its weights
        result[role] = {"params": built.num_parameters()}
        if whole:
            result[role].update(runtime_ms_measured=ms[role], tokens_per_s=scenario.throughput(ms[role]))
        result[role].update(memory_mib(built, scenario))
        if task is not None:
            with torch.no_grad():
                logits = (lambda x, m=model: m(x).logits) if whole else task_logits_layerwise(model, task)
                result[role]["task_accuracy"] = task_accuracy(logits, task)
    return result
