"""The runtimes that serve a child, and what each can read of a nemotron-nas checkpoint.

``--runtime`` names the one that will serve the child. The search space
leaves out what it cannot run (``SearchSpace`` and the solve pass), and lower
refuses a checkpoint it would misread (``check_checkpoint``). What each
runtime reads is in shared/REFERENCES.md ("What each runtime reads").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from hwopt.errors import HwoptError
from hwopt.model.config import BlockConfig, rebuilt_by_ffn_mult


@dataclass(frozen=True)
class Runtime:
    name: str
    linear: bool  # runs replace_with_linear sub-blocks
    width_from_ffn_mult: bool  # rebuilds every FFN width from ffn_mult alone (ignores intermediate_size)
    reads: str  # what it loads, for messages and help
    linear_ffn: bool = True  # runs a replace_with_linear FFN (when it runs linear sub-blocks at all)
    lone_no_op_ffn: bool = True  # runs a no-op FFN under an attention that is not no-op
    no_op_last_layer: bool = True  # runs a model whose last layer is no-op throughout

    def problems(self, blocks: list[BlockConfig], config) -> list[str]:
        """Why this runtime would fail on or misread these layers of a child of ``config`` (empty: none).

        The parent's own FFN width is not counted: when it is off the ffn_mult grid, the runtime misreads
        the parent too, and ``warn_off_grid_parent`` says so instead. The last layer is checked as such only when
        ``blocks`` are all of ``config``'s layers.
        """
        out = []
        last = blocks[-1] if blocks and len(blocks) == config.num_hidden_layers else None
        if last is not None and not self.no_op_last_layer and all(
                getattr(sub, "no_op", False) for sub in (last.attention, last.ffn)):
            out.append(f"layer {len(blocks) - 1}, the last, is no-op throughout, which {self.name} aborts on")
        for i, block in enumerate(blocks):
            for kind, sub in (("attention", block.attention), ("ffn", block.ffn)):
                if getattr(sub, "replace_with_linear", False) and not (self.linear and (kind != "ffn" or
                                                                                        self.linear_ffn)):
                    out.append(f"layer {i} has a linear {kind}, which {self.name} cannot run")
            if (getattr(block.ffn, "no_op", False) and not getattr(block.attention, "no_op", False)
                    and not self.lone_no_op_ffn):
                out.append(f"layer {i} has a no-op FFN under an attention, which {self.name} drops with it")
            width = getattr(block.ffn, "intermediate_size", None)
            if width and width != config.intermediate_size and self.width_from_ffn_mult:
                rebuilt = rebuilt_by_ffn_mult(width, config.hidden_size)
                if rebuilt != width:
                    out.append(f"layer {i}'s FFN width {width} is rebuilt as {rebuilt} from its ffn_mult "
                               f"by {self.name}")
        return out


RUNTIMES = {r.name: r for r in (
    Runtime("vllm", linear=False, width_from_ffn_mult=True, reads="the nemotron-nas checkpoint"),
    Runtime("sglang", linear=False, width_from_ffn_mult=True, reads="the nemotron-nas checkpoint"),
    Runtime("tensorrt-llm", linear=True, width_from_ffn_mult=True, reads="the nemotron-nas checkpoint"),
    # llama.cpp's deci (src/models/deci.cpp): no linear FFN (the converter cannot map mlp.linear_mlp), and a layer
    # whose FFN is no-op is skipped whole, its attention and residual included; one no-op throughout as the last
    # layer aborts (GGML_ASSERT(buffer) in ggml-backend.cpp). benchmarks/gguf.py shows all three.
    Runtime("llama.cpp", linear=True, width_from_ffn_mult=True, reads="GGUF converted from the checkpoint ('deci')",
            linear_ffn=False, lone_no_op_ffn=False, no_op_last_layer=False),
    Runtime("transformers", linear=True, width_from_ffn_mult=False,
            reads="the checkpoint's own modeling code (trust_remote_code), or hwopt's registered classes"),
    Runtime("hwopt", linear=True, width_from_ffn_mult=False, reads="hwopt.load_model"),
)}


def default_runtime(target) -> str:
    """The runtime the target's engine reads: TensorRT-LLM on a GPU, transformers on a CPU."""
    return "tensorrt-llm" if target.kind == "gpu" else "transformers"


def resolve_runtime(name: str | None, target) -> Runtime:
    """``--runtime`` (None: the target's default) as a ``Runtime``; HwoptError for an unknown name."""
    name = name or default_runtime(target)
    if name not in RUNTIMES:
        raise HwoptError(f"unknown --runtime {name!r} (known: {', '.join(RUNTIMES)})")
    return RUNTIMES[name]


def warn_off_grid_parent(blocks: list[BlockConfig], config) -> None:
    """Warn once when layers keep a parent FFN width that readers using only ``ffn_mult`` rebuild differently."""
    width = config.intermediate_size
    layers = [i for i, b in enumerate(blocks) if getattr(b.ffn, "intermediate_size", None) == width]
    if layers and (rebuilt := rebuilt_by_ffn_mult(width, config.hidden_size)) != width:
        misreaders = ", ".join(r.name for r in RUNTIMES.values() if r.width_from_ffn_mult)
        warnings.warn(f"the parent's FFN width {width} (layers {layers}) is off the ffn_mult grid: {misreaders} "
                      f"rebuild it as {rebuilt} and cannot load these weights (nor the parent's); "
                      f"{', '.join(r.name for r in RUNTIMES.values() if not r.width_from_ffn_mult)} read it right",
                      stacklevel=2)


def check_checkpoint(runtime: Runtime, blocks: list[BlockConfig], config) -> None:
    """Raise HwoptError when ``runtime`` would fail on or misread a child of ``config`` with these blocks.

    A parent FFN width off the ffn_mult grid is warned about, not refused (``warn_off_grid_parent``).
    """
    warn_off_grid_parent(blocks, config)
    if problems := runtime.problems(blocks, config):
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise HwoptError(f"{runtime.name} would misread this child: {'; '.join(problems[:3])}{more}; "
                         f"re-solve with --runtime {runtime.name} (the search then leaves these out) or lower "
                         "for another --runtime")


def runnable_library(library: dict, runtime: Runtime, config) -> dict:
    """A block library (``score/block_library.json``) without the variants ``runtime`` cannot run or would misread.

    Entries without a ``block_config`` (published libraries) are kept: there is nothing to check them by.
    """
    from hwopt.plugins import block_types  # here, not at the top: the CLI reads ``RUNTIMES`` for its help

    def runnable(entry: dict) -> bool:
        block = entry.get("block_config")
        if block is None:
            return True
        return not runtime.problems([BlockConfig.from_json(block, config, block_types(), "block_config")], config)

    return {layer: {name: entry for name, entry in variants.items() if runnable(entry)}
            for layer, variants in library.items()}
