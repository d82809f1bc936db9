"""What every object a plugin registers provides: one protocol per hook, with the real signatures.

``hwopt/hookspecs.py`` names the protocol each hook registers; this module
is the one place their methods, shapes and units are written down. The
built-ins in ``hwopt/builtin`` implement exactly these, so they are worked
examples of each.

=========================================  ==========================================
hook                                       registers
=========================================  ==========================================
``hwopt_register_block_types``             ``BlockType``
``hwopt_register_metrics``                 ``Metric`` (``hwopt.metric``)
``hwopt_register_backends``                ``Backend``
``hwopt_register_targets``                 ``Target`` (``hwopt.targets``)
``hwopt_register_solvers``                 ``Solver`` (``hwopt.problem``)
``hwopt_register_formats``                 ``Format``
``hwopt_register_models``                  ``ModelSpec`` (``hwopt.model_source``)
=========================================  ==========================================

Shapes below: ``batch`` sequences of ``tokens`` each, ``hidden`` the model's
width. A "model config" is the parent's Llama fields: a
``hwopt.model.architecture.ModelConfig`` where hwopt only prices the model
(``hwopt estimate``), transformers' ``LlamaConfig`` where it builds one in
torch; both have the same attributes (``hidden_size``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ...). While a ``block_configs`` entry is
read, it is an object with at least ``hidden_size`` and ``num_attention_heads``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from hwopt.metric import Metric
from hwopt.targets import Target

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hwopt.problem import Solver
    from hwopt.roofline import CostTerms
    from hwopt.search_space import Scenario, SearchSpace
    from hwopt.workload import Phase, Workload

__all__ = ["NO_CACHE", "Backend", "BlockType", "Format", "KVCacheShape", "Metric", "Solver", "Target"]

_RENAMED = {"HardwareProfile": "Target", "Lowering": "Format"}  # old name -> new, kept for one release


def __getattr__(name: str):
    """``Solver``, from ``hwopt.problem`` on first use: that module needs numpy, which block types do not.
    A renamed protocol's old name gives the new one, with a DeprecationWarning."""
    if name == "Solver":
        from hwopt.problem import Solver

        return Solver
    if name in _RENAMED:
        import warnings

        warnings.warn(f"hwopt.protocols.{name} is deprecated: use {_RENAMED[name]}", DeprecationWarning,
                      stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'hwopt.protocols' has no attribute {name!r}")


@dataclass(frozen=True)
class KVCacheShape:
    """What a sub-block keeps per sequence for the tokens after it: elements per token, and how many tokens.

    ``per_token`` is the shape of one token's entry: ``(2, kv_heads, head_dim)``
    for grouped-query attention (K and V), ``(rank,)`` for a latent cache,
    ``()`` for none. ``max_tokens`` caps the tokens kept (a window of W keeps
    at most W); None keeps them all. The measuring backends hold a cache of
    the ``(2, kv_heads, head_dim)`` form as K and V tensors of shape
    ``[batch, kv_heads, tokens, head_dim]``.
    """

    per_token: tuple[int, ...] = ()
    max_tokens: int | None = None

    @property
    def elements_per_token(self) -> int:
        return math.prod(self.per_token) if self.per_token else 0

    def tokens(self, context: int) -> int:
        """Tokens kept after ``context`` tokens have been seen."""
        return context if self.max_tokens is None else min(context, self.max_tokens)

    def elements(self, context: int) -> int:
        """Elements one sequence keeps after ``context`` tokens (multiply by the KV dtype's bytes)."""
        return self.tokens(context) * self.elements_per_token


NO_CACHE = KVCacheShape()


class BlockType(Protocol):
    """A family of attention or FFN sub-blocks; its config objects are its own (any frozen dataclass).

    ``cfg`` below is one of this type's configs: hashable, compared by value,
    and ``matches`` accepts exactly these. Every pass (library, score,
    uptrain, the backends, the roofline, estimate, lower) reaches a sub-block
    only through these methods, so a setting of the type's own travels
    through all of them in ``cfg`` and in its ``block_configs`` entry.
    """

    name: str  # unique among block types, e.g. "gqa"
    kind: str  # "attention" or "ffn": which half of a decoder layer it replaces
    keys: frozenset[str]  # the keys its block_configs entry may set (e.g. {"n_heads_in_group", "window_length"})
    options: Mapping[str, str]  # optional: search-space options it reads (--window), name -> help

    def variants(self, model_config, space: SearchSpace) -> list[Any]:
        """The configs to offer for a layer of the parent described by ``model_config`` (may be empty)."""

    def variant_name(self, cfg, model_config) -> str:
        """A short unique name for the variant, used in libraries and reports (``kv2``, ``ffn768``)."""

    def matches(self, cfg) -> bool:
        """Whether ``cfg`` is one of this type's configs; exactly one registered type may accept a config."""

    def claims(self, entry: dict) -> bool:
        """Whether a ``block_configs`` entry (the ``attention`` or ``ffn`` object) may describe one of this
        type's sub-blocks. Look only at what decides the type (flags, the presence of a key); checking values
        is ``from_json``'s job. When several types claim an entry, it is the one whose ``keys`` cover every
        key the entry sets; two such are an error."""

    def to_json(self, cfg, model_config) -> dict:
        """The ``block_configs`` entry, in nemotron-nas spelling, that ``from_json`` reads back to ``cfg``."""

    def from_json(self, entry: dict, model_config, where: str) -> Any:
        """The config an entry describes.

        Raises:
            HwoptError: one line naming ``where`` (file and layer) and the key, for a bad field; build the
                reads with ``hwopt.model.config.Fields(entry, where, "attention.")``.
        """

    def build(self, cfg, model_config) -> nn.Module | None:
        """The sub-block, with random weights; None for a sub-block that is removed (no weights, no norm).

        The module is called ``module(x, position_embeddings, cache, layer_idx)`` with ``x`` the normalised
        hidden states ``[batch, tokens, hidden]``, ``position_embeddings`` the rotary ``(cos, sin)``, each
        ``[1, tokens, head_dim]``, ``cache`` a ``hwopt.model.modeling.KVCache`` or None, and ``layer_idx``
        the cache slot; it returns ``[batch, tokens, hidden]``, its contribution to the residual stream. A
        sub-block that mixes no tokens may ignore all but ``x``. One with a cache appends the new tokens'
        entries with ``cache.update(k, v, layer_idx)`` and may trim them to what ``kv_cache`` promises.
        """

    def init_from_parent(self, module: nn.Module, parent: nn.Module, x: torch.Tensor,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Initialise ``module`` (built by ``build``) from the parent's sub-block of the same kind, before
        blockwise distillation; ``x`` is the parent's normalised input ``[batch, tokens, hidden]`` on
        calibration text and ``position_embeddings`` its rotary ``(cos, sin)``."""

    def num_params(self, cfg, model_config) -> int:
        """Parameters of the sub-block, its RMSNorm included (0 for a removed one)."""

    def kv_cache(self, cfg, model_config) -> KVCacheShape:
        """What the sub-block caches per sequence (``NO_CACHE`` for none)."""

    def cost_terms(self, cfg, model_config, phase: Phase) -> CostTerms:
        """FLOPs and elements moved by one forward of ``phase`` (``hwopt.roofline`` gives the conventions)."""


class Backend(Protocol):
    """A measurement backend: how a piece of the model's cost on a target is found."""

    name: str
    measures: bool  # True: it times real runs on a device; False: it estimates

    def available(self, target: Target, scenario: Scenario) -> tuple[bool, str]:
        """Whether it can work here for that target and scenario, and if not, why not (one line)."""

    def describe(self, target: Target, scenario: Scenario) -> dict[str, str]:
        """The source every figure it makes carries: ``device``, ``backend`` and ``method`` when it measures,
        ``model`` when it estimates."""

    def prepare(self, workload: Workload, target: Target) -> Callable[[], list[float]]:
        """Everything set up (and warmed up) to time ``workload``; returns a timer whose every call is one
        round: the milliseconds of each of ``workload.phases``, in order (``hwopt.workload`` builds the
        pieces). The profile calls the timers of all variants in turn, round after round
        (``hwopt.timing``), so a round should be short and must not depend on the rounds before it."""


class Format(Protocol):
    """An output format for the child: what ``--format`` names and the lower pass writes."""

    name: str
    description: str  # what it writes: one line for ``hwopt plugins``, ``hwopt lower --help`` and messages
    needs: str  # what must be installed or present to write it, for ``hwopt lower --help``

    def lower(self, model, tokenizer, out_dir, options) -> None:
        """Write ``model`` (a ``hwopt.model.modeling.HeteroLlamaForCausalLM``) and its tokenizer (or None)
        into the folder ``out_dir`` (a ``pathlib.Path``, created by the format), which the pipeline
        then renames into place. ``options`` is a ``hwopt.passes.lower.LowerOptions`` (runtime, target,
        scenario and its dtype). Raises HwoptError where its tool or device is missing; a format may
        also have ``available(options) -> (bool, reason)``, asked before anything is written, and
        ``streams = True`` when its ``lower`` also takes the child read a piece at a time (a
        ``hwopt.model.layerwise.LayerwiseParent``: ``config``, ``block_configs``, ``pieces()``): where every
        format asked for streams, the lower pass never loads the child whole."""

