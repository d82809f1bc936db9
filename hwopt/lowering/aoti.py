"""The whole child as an AOTInductor package (``.pt2``): compiled ahead of time for one device, run without Python code.

The package holds ``hwopt.lowering.onnx_kv.KVCacheStep``, so it is called
as the ONNX graph is, with positional tensors::

    runner = torch._inductor.aoti_load_package("model.cpu.pt2")
    logits, *present = runner(input_ids, attention_mask, position_ids, *past)

``input_ids`` [batch, new] int64, ``attention_mask`` [batch, past + new]
int64, ``position_ids`` [batch, new] int64, then each cached layer's key and
value [batch, kv_heads, past, head_dim] in layer order
(``onnx_kv.input_names``); a prefill passes pasts of length 0. It returns
logits [batch, new, vocab] and each layer's present key and value, the next
step's past (``run_aoti_step`` does this bookkeeping). Batch and lengths are
dynamic.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hwopt.lowering.onnx_kv import KVCacheStep, dynamic_shapes, example_inputs


def export_aoti(model, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Compile ``model`` for ``device`` (cpu or cuda) with AOTInductor and write the package to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = KVCacheStep(model.to(device=device, dtype=dtype)).eval()
    inputs = tuple(t.to(device) for t in example_inputs(model, dtype=dtype))
    with torch.no_grad():
        program = torch.export.export(step, inputs, dynamic_shapes=dynamic_shapes(model))
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def empty_past(model, batch: int, dtype=torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    """Length-0 pasts for a prefill, one key and one value per cached layer."""
    return [t[:batch, :, :0].to(device) for t in example_inputs(model, batch=batch, dtype=dtype)[3:]]


def run_aoti_step(runner, input_ids, past: list[torch.Tensor], cached: int):
    """One call of a loaded package after ``cached`` tokens: returns (logits, present)."""
    batch, new = input_ids.shape
    mask = torch.ones(batch, cached + new, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(cached, cached + new, device=input_ids.device).expand(batch, -1)
    logits, *present = runner(input_ids, mask, positions, *past)
    return logits, present
