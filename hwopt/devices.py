"""Where the passes that run a model run it, and in which dtype (``--device``, ``--train-dtype``).

``--device auto`` is the target's GPU when the target is a GPU and CUDA sees
one here, else this machine's CPU; under ``torchrun`` each process takes the
GPU of its ``LOCAL_RANK``. ``--train-dtype`` is the dtype the parent's
weights and the activations are held in: by default bf16 on a GPU and on a
CPU that multiplies bf16 natively (AMX or AVX512-BF16: uptraining about
1.7x faster than in fp32 there, to the same quality; see README "Data"),
else fp32.
Trainable weights (BLD's variants, the uptrained child) and their AdamW
state stay fp32; their forwards run under ``torch.autocast`` in the train
dtype (mixed precision, as Megatron and FSDP's ``MixedPrecisionPolicy`` do),
so that bf16 updates never round small steps away. Whole models timed and
compared as deployed (solve's speed checks, the closing report) are held in
the scenario's dtype instead (``deployed_placement``).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from hwopt.errors import HwoptError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
TRAIN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    """A device and the dtype models are held in there."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(name for name, dtype in TRAIN_DTYPES.items() if dtype == self.dtype)

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for a forward with fp32 trainable weights: the train dtype's matmuls, or nothing in
        fp32 (then the forward is exactly the fp32 one)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def runs_on(self, target) -> bool:
        """Whether a figure measured here is a measurement of ``target`` (a ``Target``): the CPU target
        is this machine's CPU; a GPU target is the CUDA device here only when it recognises the name."""
        if self.device.type == "cuda":
            return target.kind == "gpu" and target.recognises(torch.cuda.get_device_name(self.device))
        return target.kind == "cpu"

    def describe(self) -> str:
        """``cuda:0 (NVIDIA H100 80GB HBM3), bf16`` or ``cpu (<this CPU>), fp32``: what a measured figure names."""
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        else:
            from hwopt.targets import resolve_target

            name = resolve_target("cpu").description
        return f"{self.device} ({name}), {self.dtype_name}"


def resolve_device(spec: str, target_kind: str) -> torch.device:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` is ``cuda`` for a GPU target when CUDA sees a device here, else ``cpu``. Plain ``cuda`` is the
    device of this process's ``LOCAL_RANK`` (set by torchrun; 0 otherwise).

    Raises:
        HwoptError: an unknown spec, ``cuda`` without a CUDA device, or an index beyond those present.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if target_kind == "gpu" and torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not spec.startswith("cuda:"):
        raise HwoptError(f"--device {spec}: choose {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        raise HwoptError(f"--device {spec}: torch sees no CUDA device here (torch {torch.__version__}); "
                         "use --device cpu")
    index = int(os.environ.get("LOCAL_RANK", 0)) if spec == "cuda" else spec.removeprefix("cuda:")
    try:
        index = int(index)
    except ValueError:
        raise HwoptError(f"--device {spec}: the GPU index must be a number") from None
    if not 0 <= index < torch.cuda.device_count():
        raise HwoptError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices here")
    return torch.device("cuda", index)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` when it is a GPU; None on the CPU (whose budget is ``--max-memory``)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16), where oneDNN's bf16 matmuls beat
    fp32's; elsewhere torch emulates bf16 on the CPU, slower than fp32. torch asks cpuinfo (``torch.cpu``'s
    private probes; a torch without them counts as no). ``HWOPT_CPU_BF16=0`` or ``1`` in the environment
    answers instead (the tests run fp32 on any CPU so)."""
    if (forced := os.environ.get("HWOPT_CPU_BF16")) in ("0", "1"):
        return forced == "1"
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_placement(device: str, train_dtype: str | None, target_kind: str) -> Placement:
    """``--device`` and ``--train-dtype`` (None: bf16 on a GPU or on a CPU with native bf16, else fp32).

    Raises:
        HwoptError: as ``resolve_device``, or a train dtype other than bf16 and fp32.
    """
    resolved = resolve_device(device, target_kind)
    name = train_dtype or ("bf16" if resolved.type == "cuda" or native_bf16_cpu() else "fp32")
    if name not in TRAIN_DTYPES:
        raise HwoptError(f"--train-dtype {name}: choose {' or '.join(TRAIN_DTYPES)}")
    return Placement(resolved, TRAIN_DTYPES[name])


def deployed_placement(placement: Placement, scenario_dtype: str) -> Placement:
    """Where a parent and child are timed and compared as they will serve: ``placement``'s device, in the
    scenario's dtype where models are held in it there (fp32, bf16), else in ``placement``'s (an fp16 or fp8
    scenario). Training in bf16 on a CPU must not time an fp32 deployment in bf16."""
    return Placement(placement.device, TRAIN_DTYPES.get(scenario_dtype, placement.dtype))


FP32_CPU = Placement(torch.device("cpu"), torch.float32)  # what every pass ran on before --device
