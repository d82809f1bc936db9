"""The whole child as one ONNX graph with its KV cache, in the names Optimum and onnxruntime-genai use.

Inputs: ``input_ids`` [batch, sequence] int64, ``attention_mask`` [batch,
past_sequence + sequence] int64 (1 real, 0 padding), ``position_ids`` [batch,
sequence] int64, and for each layer ``i`` whose attention caches keys and
values, ``past_key_values.{i}.key`` and ``.value`` [batch, kv_heads_i,
past_sequence, head_dim]. Outputs: ``logits`` [batch, sequence, vocab] and
``present.{i}.key`` / ``.value`` [batch, kv_heads_i, past_sequence + sequence,
head_dim], which are the next step's past. ``i`` is the layer's own index, so
a child whose layer 3 has no attention has no ``past_key_values.3.*``; each
layer keeps its own KV-head count. The first step passes pasts of length 0.

Batch and lengths are dynamic. Weights go to ``model.onnx.data`` beside the
graph when they pass 2 GB (the protobuf limit). Exported with torch.onnx's
dynamo exporter (``hwopt.onnx_export`` says why).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hwopt.onnx_export import OPSET, quiet_exporter

PROTOBUF_LIMIT = 2 * 1024**3


def kv_layers(model) -> list[int]:
    """Indices of the layers whose attention has a KV cache."""
    return [i for i, block in enumerate(model.block_configs) if block.attention.n_heads_in_group]


def input_names(model) -> list[str]:
    past = [f"past_key_values.{i}.{kind}" for i in kv_layers(model) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(model) -> list[str]:
    return ["logits", *(f"present.{i}.{kind}" for i in kv_layers(model) for kind in ("key", "value"))]


class TensorCache:
    """The past of each cached layer as given; ``update`` appends this step's keys and values.

    ``update(k, v, layer_idx)`` is transformers' cache protocol.
    """

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.present = dict(past)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.present[layer_idx]
        self.present[layer_idx] = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        return self.present[layer_idx]


class KVCacheStep(nn.Module):
    """One forward of the model with plain tensors in and out: what is exported (inputs and outputs as above)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = kv_layers(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = TensorCache({layer: (past[2 * j], past[2 * j + 1]) for j, layer in enumerate(self.layers)})
        out = self.model(input_ids, past_key_values=cache, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits, *(t for layer in self.layers for t in cache.present[layer])


def example_inputs(model, batch: int = 2, sequence: int = 3, past: int = 5, dtype=torch.float32) -> tuple:
    """Inputs of a step with ``past`` cached tokens (random ids, no padding), in ``input_names`` order."""
    config = model.config
    ids = torch.randint(0, config.vocab_size, (batch, sequence))
    mask = torch.ones(batch, past + sequence, dtype=torch.long)
    positions = torch.arange(past, past + sequence).expand(batch, -1)
    width = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    pasts = []
    for i in kv_layers(model):
        kv_heads = config.num_attention_heads // model.block_configs[i].attention.n_heads_in_group
        pasts += [torch.randn(batch, kv_heads, past, width, dtype=dtype) for _ in ("key", "value")]
    return ids, mask, positions, *pasts


def dynamic_shapes(model) -> tuple:
    """Batch, sequence and past lengths dynamic; their relations are found by torch.export (``Dim.AUTO``)."""
    auto = torch.export.Dim.AUTO
    past = tuple({0: auto, 2: auto} for _ in range(2 * len(kv_layers(model))))
    return {0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, past  # the pasts are forward's *past


def export_onnx(model, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` (in ``dtype``) as ``path``; weights beyond 2 GB into ``path``.data. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = KVCacheStep(model.to(dtype)).eval()
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > PROTOBUF_LIMIT
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(step, example_inputs(model, dtype=dtype), path, dynamo=True, verbose=False,
                          opset_version=OPSET, input_names=input_names(model), output_names=output_names(model),
                          dynamic_shapes=dynamic_shapes(model), external_data=large)
    return path


class OnnxRuntimeModel:
    """The exported graph in an ONNX Runtime session, fed its own presents back as pasts.

    ``step`` takes ``input_ids`` [batch, new] and returns logits [batch, new,
    vocab] as a numpy array, keeping the cache between calls; ``reset``
    forgets it. CPU execution provider unless told otherwise.
    """

    def __init__(self, path: Path, providers=("CPUExecutionProvider",)):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers))
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.reset()

    def reset(self) -> None:
        self.past: list | None = None
        self.mask = None

    def step(self, input_ids):
        import numpy as np

        batch, new = input_ids.shape
        if self.past is None:  # kv heads and head_dim are fixed in the graph; past length 0
            dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
            self.past = [np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=dtypes[i.type]) for i in self.past_inputs]
            self.mask = np.zeros((batch, 0), dtype=np.int64)
        cached = self.mask.shape[1]
        self.mask = np.concatenate([self.mask, np.ones((batch, new), dtype=np.int64)], axis=1)
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": self.mask,
                 "position_ids": np.broadcast_to(np.arange(cached, cached + new, dtype=np.int64), (batch, new)).copy(),
                 **{i.name: p for i, p in zip(self.past_inputs, self.past)}}
        logits, *self.past = self.session.run(None, feeds)
        return logits

    def greedy_tokens(self, prompts, new_tokens: int):
        """Greedy decoding like ``hwopt.model.modeling.greedy_tokens``: [batch, new_tokens] numpy ids."""
        import numpy as np

        self.reset()
        tokens = [self.step(prompts)[:, -1].argmax(-1)[:, None]]
        for _ in range(new_tokens - 1):
            tokens.append(self.step(tokens[-1])[:, -1].argmax(-1)[:, None])
        return np.concatenate(tokens, axis=1)
