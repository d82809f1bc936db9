"""Built-in measurement backend: torch, timed by the wall clock on this CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from hwopt.hookspecs import hookimpl


class TorchCPUBackend:
    """Wall-clock timing of torch modules on this machine's CPU.

    Each repeat runs on the next of several inputs in turn, so a figure is not
    flattered by data left in cache from the previous repeat.
    """

    name = "torch"
    device = "cpu"

    def available(self, target) -> tuple[bool, str]:
        if target.kind != "cpu":
            return False, (f"the torch backend measures on this machine's CPU, not on {target.name} "
                           "(GPU timing is not implemented yet)")
        return True, ""

    def describe(self) -> str:
        return f"torch {torch.__version__} on cpu, {torch.get_num_threads()} threads, wall clock"

    @torch.inference_mode()
    def time_ms(self, fn: Callable, inputs: Sequence, warmup: int = 2, repeats: int = 5) -> float:
        """Median milliseconds of ``fn(input)`` over ``repeats`` runs after ``warmup`` runs."""
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        times = []
        for i in range(repeats):
            x = inputs[i % len(inputs)]
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


@hookimpl
def hwopt_register_backends(register):
    register(TorchCPUBackend())
