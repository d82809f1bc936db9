"""A run's settings: one set of defaults, the groups of them passes read, and how a command's options merge in.

Settings come from the defaults below, then the run directory's
``run.json`` (what earlier commands on this run said), then the command
line. This module imports neither torch nor transformers: the command line
reads it to build each command's options and help.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.pipeline import UNSET

if TYPE_CHECKING:
    from hwopt.solving import Budgets

DEFAULT_SCENARIO = "128/64"  # INPUT/OUTPUT tokens per request, wherever a command takes --scenario
EVALUATION_TOKENS = 4096  # of the corpus's held-out tenth, measured by a run's closing report and hwopt evaluate


@dataclass
class Settings:
    model: str = "smollm2-135m"
    target: str = "cpu"
    scenario: str = DEFAULT_SCENARIO
    batch: int = 1
    dtype: str | None = None  # default: bf16 on a GPU target, fp32 on the CPU
    kv_dtype: str | None = None  # default: the dtype
    backend: str = "auto"
    require_measured: bool = False
    repeats: int = 5
    max_spread: float | None = None  # a measured figure's IQR / median above this is an error
    threads: int | None = None  # torch's CPU threads; chosen by the run's first command (idle cores), then kept
    data: list[str] | None = None
    distill_samples: int = 131072  # tokens sampled from the parent, mixed into training (0: none)
    distill_temperature: float = 0.8  # of that sampling: below 1, the parent's more likely text
    seq_len: int = 128
    kv_heads: list[int] | None = None
    ffn_fractions: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.25])
    linear: bool = True
    no_op: bool = True
    two_layer: bool = False  # also blocks that replace two consecutive parent layers (hwopt.two_layer)
    block_types: list[str] = field(default_factory=list)  # plugins whose block types the run uses, besides built-ins
    block_options: dict[str, list] = field(default_factory=dict)  # their options (--window 64,256), by name
    bld_tokens: int = 16384
    bld_lr: float = 5e-4
    score_tokens: int = 512
    score_pairs: str = "decoupled"  # or "coupled": run every (attention, FFN) pair
    metrics: list[str] = field(default_factory=lambda: ["kl_div"])
    task_data: str | None = None  # multiple-choice JSONL for metrics that need "task"
    objective: str | None = None  # default: the first metric
    speedup: float | None = None
    memory: str | None = None
    throughput: float | None = None
    latency: float | None = None  # ms, the whole batch's generation
    ttft: float | None = None  # ms to the first token
    params: str | None = None  # e.g. 50B, 135M
    solver: str = "scip"
    num_solutions: int = 1
    min_diversity: int = 1
    time_limit: float = 60.0  # seconds per solution
    coupled_bld: int = 0  # coupled BLD on the pairs of this many diverse decoupled solutions, then solve again
    speedup_checks: int = 3  # on this CPU: children solved and timed at most until one measures --speedup
    select_tokens: int = 16384  # GKD tokens per candidate child before solve keeps one (hwopt.selection; 0: off)
    uptrain_tokens: int = 262144  # 512 steps of 4 x 128 tokens: with solve's candidates, what fits the 30-minute
    # demo on 2 cores
    uptrain_lr: float = 6e-4
    uptrain_sharding: str = "auto"  # under torchrun: ddp, fsdp, or auto (fsdp when the ddp plan does not fit)
    formats: list[str] = field(default_factory=lambda: ["nemotron-nas"])
    runtime: str | None = None  # the runtime that serves the child (default: the target's, see hwopt.lowering.runtimes)
    seed: int = 0
    device: str = "auto"  # where library, score, uptrain and the report run: auto, cpu, cuda, cuda:N
    train_dtype: str | None = None  # parent and activations there: bf16 on a GPU or a CPU with native bf16, else fp32
    max_memory: str | None = None  # host memory per rank a pass may plan for (e.g. 8GiB); none: no limit

    @property
    def objective_key(self) -> str:
        """The library key solve optimises: --objective, else the first metric."""
        return self.objective or f"metrics.{self.metrics[0]}"

    @property
    def budgets(self) -> Budgets:
        from hwopt.solving import Budgets

        return Budgets(self.speedup, self.memory, self.throughput, self.latency, self.ttft, self.params)

    def check_names(self) -> None:
        """The model, target, scenario and budgets resolved without torch (a tenth of a second), so a mistyped one
        fails at once, before a pass imports the seconds of torch it needs; the passes' own checks follow.
        Raises ``HwoptError`` naming the option."""
        from hwopt.model_source import resolve_model
        from hwopt.search_space import Scenario
        from hwopt.targets import resolve_target

        target = resolve_target(self.target)
        resolve_model(self.model)
        Scenario.for_target(target, self.scenario, self.batch, self.dtype, self.kv_dtype)
        _ = self.budgets


# groups of settings that several passes read (their ``PassInfo.settings``, in ``hwopt.passes``)
SEARCH_SPACE = ("model", "kv_heads", "ffn_fractions", "linear", "no_op", "block_types", "block_options")
DATA = ("data", "distill_samples", "distill_temperature", "seq_len", "seed")
PLACEMENT = ("device", "train_dtype")  # where a pass runs the model changes its results (slightly)


def load_settings(workdir: Path, overrides: dict) -> Settings:
    """Defaults, then the run's saved settings, then ``overrides`` (values that are not None).

    An override of ``UNSET`` puts a setting whose default is None back to None.
    """
    saved = saved_settings(Path(workdir) / "run.json")
    names = {f.name for f in dataclasses.fields(Settings)}
    unsettable = {f.name for f in dataclasses.fields(Settings) if f.default is None}
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        if value == UNSET and key not in unsettable:
            raise HwoptError(f"--{key.replace('_', '-')} cannot be unset: it has a default, give a value instead")
    merged = {**{k: v for k, v in saved.items() if k in names},
              **{k: None if v == UNSET else v for k, v in given.items()}}
    return Settings(**merged)


def saved_settings(path: Path) -> dict:
    """The settings a run's ``run.json`` at ``path`` remembers ({} when there is none); keys hwopt does not know
    (from another version) are kept, and ignored by ``load_settings``.

    Raises:
        HwoptError: naming the file (and the key) when it is not a JSON object, or a known setting in it has a
            value of another type than the setting's (``"speedup": "fast"``).
    """
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HwoptError(f"{path} is not readable JSON ({err}); it holds the settings earlier commands on "
                         "this run saved: mend it") from None
    if not isinstance(saved, dict):
        raise HwoptError(f"{path} must hold a JSON object of settings, not a {type(saved).__name__}")
    hints = typing.get_type_hints(Settings)
    for key, value in saved.items():
        if key in hints and not _fits(value, hints[key]):
            raise HwoptError(f"{path}: setting {key!r} is {json.dumps(value)}, where it takes {_describe(hints[key])}")
    return saved


def _fits(value, hint) -> bool:
    """Whether a JSON ``value`` is of the type ``hint`` (a ``Settings`` field's annotation) names."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list or hint is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value if args)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return True  # no other kind of setting exists


def _describe(hint) -> str:
    """``list[str] | None`` -> "list[str] or null", as a run.json's reader would name it."""
    parts = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    return " or ".join("null" if part is type(None) else part.__name__ if isinstance(part, type) else str(part)
                       for part in parts)


def run_containing(path: str | Path) -> tuple[Path, dict] | None:
    """The run directory ``path`` lies in (its nearest ancestor, or itself, holding a ``run.json``) and that run's
    saved settings; None when it lies in none or does not exist (a model name is no path). How ``hwopt evaluate``
    knows a run's child. Raises ``HwoptError`` for a ``run.json`` that does not read (``saved_settings``)."""
    if not Path(path).exists():
        return None
    for directory in (Path(path).resolve(), *Path(path).resolve().parents):
        if (directory / "run.json").is_file():
            return directory, saved_settings(directory / "run.json")
    return None


def default(name: str):
    """The default of one setting (``default("bld_lr")``), for code that must not repeat it."""
    f = next(f for f in dataclasses.fields(Settings) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
