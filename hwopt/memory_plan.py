"""The memory a pass will hold at its peak, per rank, computed before it starts from the config alone.

library and score read the parent a layer at a time (``hwopt.model.layerwise``),
so their peak is one parent layer, the embedding or the LM head, one layer's
activations and the variant in training (library) or the carried hidden states
of a wave of candidates (score). The figures are upper bounds of what the
pass allocates; the process itself (Python, torch, transformers, the
tokenised data) adds ``PROCESS_BYTES``, and the checkpoint file's pages
stay mapped while a piece is copied out of it (``transit``). On a GPU the
weights and activations are on the device, and the host holds the process
and the pages in transit. On the CPU, ``benchmarks/memory.py`` measures the
peak against the plan.

``--max-memory`` is the host budget per rank: a plan over it is refused in one
line before anything is read, and score fits its waves into what is left.
uptrain holds the whole child and parent (``uptrain_plan``), or under
torchrun, when they do not fit a rank, each rank's FSDP shards of them and
one piece read whole. The sampling of ``--distill-samples`` holds the whole
parent, or where that does not fit, one piece of it at a time, read again for
every token (``sampling_plan``). The closing report and ``hwopt evaluate``
time the parent and the child whole (``report_plan``); where they do not fit
together, they compare them a layer at a time and time neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hwopt.bld import variants_for_layer
from hwopt.devices import Placement
from hwopt.errors import HwoptError
from hwopt.model.config import BlockConfig
from hwopt.search_space import Scenario, SearchSpace, sub_variant_of
from hwopt.solving import parse_max_memory

GIB = 2**30
# peak RSS after `import hwopt.run` and reading the default data (0.50 GiB: torch 2.13 CPU, transformers 5.24)
PROCESS_BYTES = 512 * 2**20
FP32_TRAINING_BYTES = 16  # per trained parameter: fp32 weight, gradient, AdamW's two moments
ACTIVATION_COPIES = {"library": 6, "score": 3}  # per layer: its input, output and the sub-block targets (library)


@dataclass
class MemoryPlan:
    """A pass's peak memory per rank: (what, bytes) items on the host and on the device."""

    pass_name: str  # what the plan is of: a pass, or one step of one
    placement: Placement
    transit: int = 0  # the largest piece read at once: its file pages are mapped while it is copied out
    host: list[tuple[str, int]] = field(default_factory=list)
    device: list[tuple[str, int]] = field(default_factory=list)
    remedy: str = ""  # what the user can do when it does not fit, appended to ``over``'s line

    def add(self, what: str, nbytes: int) -> None:
        """An item on the pass's device (the host when that is the CPU)."""
        (self.device if self.placement.device.type == "cuda" else self.host).append((what, int(nbytes)))

    def host_items(self) -> list[tuple[str, int]]:
        return [("process (python, torch, the data)", PROCESS_BYTES), *self.host,
                ("checkpoint pages mapped while the largest piece is read", self.transit)]

    @property
    def host_bytes(self) -> int:
        return sum(n for _, n in self.host_items())

    @property
    def device_bytes(self) -> int:
        return sum(n for _, n in self.device)

    def lines(self, world: int) -> list[str]:
        """The plan as printed before the pass starts."""
        where = f"{self.placement.device}, {self.placement.dtype_name}"
        out = [f"{self.pass_name} memory plan per rank ({world} rank{'s' if world > 1 else ''}, {where}): host "
               f"{self.host_bytes / GIB:.2f} GiB" + (f", device {self.device_bytes / GIB:.2f} GiB" if self.device
                                                     else "")]
        out += [f"  host    {n / GIB:8.2f} GiB  {what}" for what, n in self.host_items()]
        out += [f"  device  {n / GIB:8.2f} GiB  {what}" for what, n in self.device]
        return out

    def over(self, max_memory: str | None, device_memory: int | None = None) -> str | None:
        """Why the plan does not fit ``--max-memory`` (host bytes per rank) or ``device_memory`` (the GPU's
        bytes): one line with the plan's total, the budget and its largest item; None when it fits."""
        if max_memory is not None and self.host_bytes > parse_max_memory(max_memory):
            what, n = max(self.host_items(), key=lambda item: item[1])
            return (f"{self.pass_name} needs {self.host_bytes / GIB:.2f} GiB of host memory per rank by its memory "
                    f"plan, over --max-memory {max_memory} (largest: {what}, {n / GIB:.2f} GiB)") + self._remedy
        if device_memory is not None and self.device_bytes > device_memory:
            what, n = max(self.device, key=lambda item: item[1])
            return (f"{self.pass_name} needs {self.device_bytes / GIB:.2f} GiB of memory on {self.placement.device} "
                    f"by its memory plan, over its {device_memory / GIB:.2f} GiB (largest: {what}, "
                    f"{n / GIB:.2f} GiB)") + self._remedy
        return None

    @property
    def _remedy(self) -> str:
        return f": {self.remedy}" if self.remedy else ""

    def check(self, max_memory: str | None, device_memory: int | None = None) -> None:
        """Refuse a plan that does not fit (``over``).

        Raises:
            HwoptError: ``over``'s line.
        """
        if problem := self.over(max_memory, device_memory):
            raise HwoptError(problem)


def layer_params(config, block: BlockConfig) -> int:
    return sum(sub_variant_of(config, cfg).block_type.num_params(cfg, config) for cfg in (block.attention, block.ffn))


def weights(config, block_configs: list[BlockConfig], placement: Placement) -> dict[str, int]:
    """Bytes of the parent's largest layer, of its embedding and of its LM head, in the pass's dtype."""
    size = placement.dtype.itemsize
    table = config.vocab_size * config.hidden_size * size
    return {"layer": max(layer_params(config, b) for b in block_configs) * size, "embedding": table,
            "head": table}


def transient(config, sequences: int, seq_len: int) -> int:
    """fp32 bytes of the widest intermediates of a forward and backward over ``sequences`` x ``seq_len`` tokens:
    the FFN's three width-sized tensors and the attention scores."""
    tokens = sequences * seq_len
    return 4 * (3 * tokens * config.intermediate_size + sequences * config.num_attention_heads * seq_len * seq_len)


def library_plan(config, block_configs: list[BlockConfig], space: SearchSpace, tokens: int, seq_len: int,
                 batch_sequences: int, placement: Placement) -> MemoryPlan:
    """library: one parent layer (or the embedding), one layer's activations, one variant in training."""
    w = weights(config, block_configs, placement)
    plan = MemoryPlan("library", placement, max(w["layer"], w["embedding"]))
    plan.add("parent layer (the largest), or the embedding", max(w["layer"], w["embedding"]))
    plan.add(f"activations of one layer ({tokens} tokens)",
             ACTIVATION_COPIES["library"] * tokens * config.hidden_size * placement.dtype.itemsize)
    largest = max((v.block_type.num_params(v.config, config) for block in set(block_configs)
                   for variants in variants_for_layer(config, block, space).values() for v in variants[1:]), default=0)
    plan.add("variant in training (fp32 weights, gradients, AdamW state)", largest * FP32_TRAINING_BYTES)
    plan.add(f"forward and backward of {batch_sequences} sequences", transient(config, batch_sequences, seq_len))
    return plan


def score_plan(config, block_configs: list[BlockConfig], tokens: int, seq_len: int, candidates: int,
               placement: Placement, max_memory: str | None, device_memory: int | None = None
               ) -> tuple[MemoryPlan, int]:
    """score: one parent layer, the final norm and LM head, the logits of the teacher and one student, and the
    carried hidden states of a wave of the rank's ``candidates`` (swapped forwards). Returns the plan and the
    carry budget in bytes: all candidates at once when they fit, else what the budget leaves (at least one
    candidate's worth). The budget is ``--max-memory`` on the CPU (1 GiB without it), nine tenths of
    ``device_memory`` on a GPU."""
    w = weights(config, block_configs, placement)
    plan = MemoryPlan("score", placement, max(w["layer"], w["embedding"]))
    plan.add("parent layer (the largest) or the embedding, and the LM head",
             max(w["layer"], w["embedding"]) + w["head"])
    state = tokens * config.hidden_size * placement.dtype.itemsize
    plan.add(f"hidden states of the parent ({tokens} tokens)", ACTIVATION_COPIES["score"] * state)
    plan.add("logits of the teacher and one student, with their log-softmax (fp32)",
             4 * tokens * config.vocab_size * 4)
    plan.add("forward of one layer", transient(config, max(1, tokens // seq_len), seq_len) // 3)
    if placement.device.type == "cuda" and device_memory is not None:
        room = int(0.9 * device_memory) - plan.device_bytes
    elif max_memory is not None:
        room = parse_max_memory(max_memory) - plan.host_bytes
    else:
        room = GIB
    carry = min(candidates * state, max(room, state))
    plan.add(f"carried hidden states of a wave ({carry // max(state, 1)} of {candidates} candidates)", carry)
    return plan, carry


def uptrain_plan(config, child_blocks: list[BlockConfig], parent_blocks: list[BlockConfig], tokens_per_step: int,
                 seq_len: int, placement: Placement, shards: int = 1) -> MemoryPlan:
    """uptrain: the child in training (fp32 with AdamW, and a copy of its weights to go back to), the parent as
    its teacher in the train dtype, and one step's activations of both with every layer's hidden states.

    ``shards`` > 1: FSDP over that many ranks (``hwopt.uptraining.sharded_models``). Each rank then holds
    1/shards of both models and their state, plus the layers gathered whole while they run. The models are built
    on the meta device and each rank reads one piece whole at a time (a parent layer with the child's variant of
    it, or the embedding) to keep its shards of it, so no rank ever holds either model whole.
    """
    table = config.vocab_size * config.hidden_size
    size = placement.dtype.itemsize
    plan = MemoryPlan("uptrain", placement, table * size)
    child = sum(layer_params(config, b) for b in child_blocks) + 2 * table
    parent = sum(layer_params(config, b) for b in parent_blocks) + 2 * table
    per_rank = f" / {shards} ranks" if shards > 1 else ""
    plan.add(f"child in training (fp32, AdamW state, a copy to go back to){per_rank}",
             child * (FP32_TRAINING_BYTES + 4) // shards)
    plan.add(f"parent as teacher ({placement.dtype_name}){per_rank}", parent * size // shards)
    if shards > 1:
        layer = max(layer_params(config, b) for b in (*child_blocks, *parent_blocks))
        gathered = 2 * layer * (size + 4) + 2 * layer * size  # two of each model; the child's with fp32 gradients
        piece = max(layer * (2 * size + 4), table * (size + 4))  # a parent layer and the child's, or the embedding,
        # with one tensor of it in fp32
        plan.add("layers gathered whole while they run, or (before) one piece read whole to build the shards",
                 max(gathered, piece))
    layers = config.num_hidden_layers
    plan.add(f"activations of one step ({tokens_per_step} tokens, both models, every layer)",
             2 * (layers + 1) * tokens_per_step * config.hidden_size * 4 + 3 * tokens_per_step * config.vocab_size * 4
             + transient(config, max(1, tokens_per_step // seq_len), seq_len) * layers // 4)
    return plan


def whole_bytes(config, blocks: list[BlockConfig], placement: Placement) -> int:
    """Bytes of a model whole in ``placement``'s dtype: its layers, the embedding, and the LM head unless it is
    the embedding's matrix."""
    tables = 1 if config.tie_word_embeddings else 2
    return (sum(layer_params(config, b) for b in blocks) + tables * config.vocab_size * config.hidden_size) * \
        placement.dtype.itemsize


def kv_cache_bytes(config, blocks: list[BlockConfig], sequences: int, seq_len: int, placement: Placement) -> int:
    """Bytes of the KV cache of ``sequences`` up to ``seq_len`` tokens each, as each attention's block type keeps
    it, in ``placement``'s dtype."""
    per_sequence = sum(sub_variant_of(config, b.attention).block_type.kv_cache(b.attention, config)
                       .elements(seq_len + 1) for b in blocks)  # elements
    return sequences * per_sequence * placement.dtype.itemsize


def sampling_plan(config, blocks: list[BlockConfig], sequences: int, seq_len: int, placement: Placement,
                  layerwise: bool = False) -> MemoryPlan:
    """Sampling ``--distill-samples`` from the parent (``hwopt.data.sample_from_parent``): the parent whole in the
    train dtype, or (``layerwise``) one piece of it at a time, read again for every token; the KV cache of
    ``sequences`` drawn at once up to ``seq_len`` tokens, and their last logits."""
    w = weights(config, blocks, placement)
    plan = MemoryPlan("sampling from the parent (--distill-samples)" + (", a layer at a time" if layerwise else ""),
                      placement, max(w["layer"], w["embedding"]))
    if layerwise:
        plan.add("parent layer (the largest), or the embedding or the LM head", max(w["layer"], w["embedding"]))
    else:
        plan.add(f"parent whole ({placement.dtype_name})", whole_bytes(config, blocks, placement))
    plan.add(f"KV cache of {sequences} sequences of {seq_len} tokens",
             kv_cache_bytes(config, blocks, sequences, seq_len, placement))
    plan.add("logits of the last token and their softmax (fp32)", 2 * sequences * config.vocab_size * 4)
    return plan


def report_plan(parent, child, scenario: Scenario, sequences: int, seq_len: int, placement: Placement,
                what: str = "report with parent and child whole", remedy: str = "") -> MemoryPlan:
    """The closing report and ``hwopt evaluate`` with both models whole in ``placement``'s dtype (the scenario's),
    as they are timed: ``parent`` and ``child`` (anything with ``config`` and ``block_configs``, such as a
    ``LayerwiseParent``), the KV cache of the scenario's generation (of the larger, as they are timed one after the
    other), and the logits of ``sequences`` held-out sequences of ``seq_len`` tokens from both (fp32, each with its
    log-softmax: ``hwopt.evaluate.compare_on_heldout``'s batch). ``what`` and ``remedy``: see ``MemoryPlan``."""
    table = parent.config.vocab_size * parent.config.hidden_size * placement.dtype.itemsize  # the largest piece
    plan = MemoryPlan(what, placement, table, remedy=remedy)
    for role, model in (("parent", parent), ("child", child)):
        plan.add(f"{role} whole ({placement.dtype_name})", whole_bytes(model.config, model.block_configs, placement))
    context = scenario.input_len + scenario.output_len
    kv = [kv_cache_bytes(m.config, m.block_configs, scenario.batch, context, placement) for m in (parent, child)]
    plan.add(f"KV cache of {scenario.batch} sequences of {context} tokens (the larger model's)", max(kv))
    plan.add(f"logits of {sequences} sequences of {seq_len} tokens from both, with their log-softmax (fp32)",
             4 * sequences * seq_len * parent.config.vocab_size * 4)
    return plan
