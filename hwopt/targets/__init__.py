"""Targets: the hardware a child is optimised for.

A target is a TOML file: those shipped with hwopt lie beside this module
(``hwopt/targets/*.toml``, package data of ``hwopt.targets``); a user may
pass the path of their own. The ``cpu`` target describes this machine, read
from the system. ``auto`` is the GPU that NVML sees, else the CPU.

A target may carry a ``[[calibration]]`` table of measured block timings
(device, backend, dtype, phase, date, milliseconds); the roofline model
fits its efficiency factors to it (``hwopt.roofline``).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hwopt.errors import HwoptError


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "gpu" or "cpu"
    description: str
    aliases: tuple[str, ...] = ()
    nvml_names: tuple[str, ...] = ()  # substrings of the name NVML reports for this device
    memory_gib: float | None = None  # device memory in GiB (2**30 bytes)
    bandwidth_gbs: float | None = None  # memory bandwidth in GB/s (1e9 bytes per second)
    peak_tflops: dict[str, float] = field(default_factory=dict)  # dtype -> dense TFLOP/s
    sources: dict[str, str] = field(default_factory=dict)  # spec -> where it comes from
    dtypes: tuple[str, ...] = ()  # what the chip computes in (default: the dtypes with a peak rate)
    calibration: tuple[dict, ...] = ()  # measured block timings, one dict per row
    path: Path | None = None  # the TOML file it was read from

    def __post_init__(self):
        if not self.dtypes:  # however the target is built (TOML or Python), its peak rates name its dtypes
            object.__setattr__(self, "dtypes", tuple(self.peak_tflops))

    def recognises(self, device_name: str) -> bool:
        """Whether NVML's (or torch's) name for a device is this target."""
        return any(n.lower() in device_name.lower() for n in self.nvml_names)

    def check_dtype(self, dtype: str, what: str = "--dtype") -> None:
        """A clear error for a dtype this target does not compute in (fp8 on an A100)."""
        if dtype not in self.dtypes:
            raise HwoptError(f"{self.name} has no {dtype} ({what}); it computes in {', '.join(self.dtypes)}")

    def default_dtype(self) -> str:
        return "bf16" if self.kind == "gpu" else "fp32"

    @classmethod
    def from_toml(cls, path: Path) -> Target:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise HwoptError(f"cannot read target file {path}: {exc}") from None
        try:
            return cls(
                name=data["name"],
                kind=data["kind"],
                description=data.get("description", ""),
                aliases=tuple(data.get("aliases", ())),
                nvml_names=tuple(data.get("nvml_names", ())),
                memory_gib=data.get("memory_gib"),
                bandwidth_gbs=data.get("bandwidth_gbs"),
                peak_tflops=dict(data.get("peak_tflops", {})),
                sources=dict(data.get("sources", {})),
                dtypes=tuple(data.get("dtypes", ())),
                calibration=tuple(data.get("calibration", ())),
                path=Path(path),
            )
        except KeyError as exc:
            raise HwoptError(f"target file {path} lacks the field {exc.args[0]!r}") from None

    def with_system_facts(self) -> Target:
        """A CPU target completed with what this machine says about itself."""
        if self.kind != "cpu":
            return self
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        cores = len(os.sched_getaffinity(0))
        return dataclasses.replace(
            self,
            description=f"{_cpu_model()} ({cores} cores available, {platform.machine()})",
            memory_gib=round(memory, 1),
            sources={**self.sources, "memory_gib": "read from the system (sysconf)",
                     "description": "read from /proc/cpuinfo and sched_getaffinity"},
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def shipped_targets() -> list[Target]:
    """The targets shipped with hwopt (``hwopt/targets/*.toml``)."""
    folder = resources.files("hwopt.targets")
    return [Target.from_toml(Path(str(f))) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".toml")]


def nvml_gpu_name() -> str | None:
    """The name NVML gives the first GPU, or None without a GPU or driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no nvidia-ml-py, no driver (NVMLError_LibraryNotFound), no device
        return None
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else name
    finally:
        pynvml.nvmlShutdown()


def auto_target() -> Target:
    """The target of the GPU NVML sees, else this CPU."""
    from hwopt.plugins import targets

    name = nvml_gpu_name()
    if name is None:
        return resolve_target("cpu")
    for known in targets():
        if known.kind == "gpu" and known.recognises(name):
            return known
    raise HwoptError(f"--target auto: NVML sees {name!r}, which no target recognises "
                     "(pass --target with a target .toml for it)")


def resolve_target(target: str) -> Target:
    """A target by name, alias or TOML path; ``auto`` is the GPU that NVML sees, else the CPU."""
    from hwopt.plugins import targets

    if target == "auto":
        return auto_target()
    if target.endswith(".toml"):
        if not Path(target).is_file():
            raise HwoptError(f"target file {target} does not exist")
        return Target.from_toml(Path(target)).with_system_facts()
    for known in targets():
        if target.lower() in (known.name, *known.aliases):
            return known.with_system_facts()
    names = ", ".join(sorted(t.name for t in targets()))
    raise HwoptError(f"unknown target {target!r} (known: {names}; or a path to a target .toml)")
