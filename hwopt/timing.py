"""Timings that hold on a busy machine: interleaved rounds, medians, their spread, and the load seen.

Timing one variant after another lets a burst of outside load land on
whichever variant happened to be running. Here every piece is timed once
per round, the order reversed every other round (A B C C B A A B C ...), so
a burst, or a load that rises or falls steadily, lands on all of them
alike, and each piece's figure is its median over the rounds. What such
load does to a whole round can also be taken out: ``normalized_rounds``
divides each round by how slow the machine ran in it, judged by all its
pieces together (on a quiet 2-core VM one probe saw the standard errors of
a profile's medians halve, 5% to 2.5%; whole profiles still left some at 7%).
The spread of a figure is its interquartile range over the rounds
relative to the median, as ``torch.utils.benchmark.Measurement`` computes
it (that class warns above 10%, "significant environmental influence").

The spread says how much single rounds scatter; what the search uses is the
median, and how precisely the rounds pin it down is its standard error,
which more rounds shrink (``median_error``). A figure is accepted when its
median is known to within ``PRECISION_BOUND`` (one standard error, relative
to the median); while some piece's is not, more rounds are run, for a bounded
time (``torch.utils.benchmark.Timer.adaptive_autorange`` does the same for
one statement). A bound on the spread itself (``--max-spread``) is stricter,
and more rounds do not help it: a two-thread kernel on a quiet machine can
scatter by more than 10% round to round with a median steady to 2%.

``CpuLoad`` says how busy other processes kept this process's cores while
it measured, which is what a too-noisy measurement is reported with, and
``idle_cores`` how many threads fit beside them: two processes whose
threads outnumber the cores spin against each other, and a small kernel
then waits for a descheduled thread at every step (tens of times slower).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import psutil

from hwopt.errors import HwoptError

PROBE_SECONDS = 1.0  # how long to watch other processes before choosing a thread count
PRECISION_BOUND = 0.04  # a median's relative standard error; = a spread of 10% (torch's warning) at 5 rounds
REMEASURE_TIME = 2.0  # extra rounds for a noisy piece: at most this many times as long as the first rounds took

Timer = Callable[[], list[float]]  # one round: milliseconds per phase


def spread(values: list[float]) -> float:
    """Interquartile range of ``values`` relative to their median (0 when the median is 0, as for a no-op)."""
    if not any(values):
        return 0.0
    from torch.utils.benchmark import Measurement  # here: only measured figures have a spread; estimates need no torch
    from torch.utils.benchmark.utils.common import TaskSpec

    measurement = Measurement(number_per_run=1, raw_times=list(values), task_spec=TaskSpec(stmt="", setup=""))
    return measurement.iqr / measurement.median


def median_error(values: list[float]) -> float:
    """The standard error of the median of ``values``, relative to the median (0 when the median is 0).

    The sample median of n draws has asymptotic variance 1 / (4 n f(m)^2),
    f(m) the density at the median (Laplace's result for sample quantiles;
    https://en.wikipedia.org/wiki/Median#Sampling_distribution); for a normal
    distribution that is (pi / 2) sigma^2 / n, so SE = 1.2533 sigma / sqrt(n).
    Sigma is estimated robustly as IQR / 1.349 (the IQR of a normal
    distribution is 1.349 sigma), as the spread is: SE = 1.2533 IQR /
    (1.349 sqrt(n)), which McGill, Tukey & Larsen's box-plot notches (The
    American Statistician 32(1), 1978) scale to 1.58 IQR / sqrt(n).
    """
    if not any(values):
        return 0.0
    return 1.2533 * spread(values) / (1.349 * len(values) ** 0.5)


def median_phases(rounds: list[list[float]]) -> list[float]:
    """Per phase, the median over rounds of its milliseconds."""
    return [statistics.median(column) for column in zip(*rounds)]


def interleaved_rounds(timers: dict[object, Timer], rounds: int, noisy: Callable[[dict], list],
                       extra_time_factor: float = REMEASURE_TIME, clock: Callable[[], float] = time.perf_counter,
                       after_round: Callable[[], object] = lambda: None) -> dict[object, list[list[float]]]:
    """Each timer's results, one per round: every timer once per round, for ``rounds`` rounds, in order and in
    reverse order in turn.

    Then, while ``noisy(results)`` names any timer, further rounds of all of
    them (so that load still hits every piece alike), for at most
    ``extra_time_factor`` times as long as the first ``rounds`` took.
    """
    results = {name: [] for name in timers}
    names = list(timers)

    def one_round():
        for name in names if len(results[names[0]]) % 2 == 0 else reversed(names):
            results[name].append(timers[name]())
        after_round()

    start = clock()
    for _ in range(rounds):
        one_round()
    deadline = clock() + extra_time_factor * (clock() - start)
    while noisy(results) and clock() < deadline:
        one_round()
    return results


def normalized_rounds(results: dict[object, list[list[float]]]) -> dict[object, list[list[float]]]:
    """``interleaved_rounds``' results with each round divided by how slow the machine ran in it.

    A round's slowness is the median, over the pieces that take any time, of
    the piece's milliseconds in that round (all phases) over its median
    across rounds: load that slows a whole round moves every piece alike and
    so this median, while one piece's own scatter does not (a median, not a
    total, so that a few scattered pieces do not pass their scatter on to the
    rest). Dividing by it leaves each piece's own scatter, as timing two
    models back to back and taking their ratio does. Returns the same shape.
    """
    totals = {name: [sum(phases) for phases in rounds] for name, rounds in results.items()}
    typical = {name: statistics.median(t) for name, t in totals.items()}
    timed = [name for name in results if typical[name] > 0]
    if not timed:
        return results
    slowness = [statistics.median(totals[name][k] / typical[name] for name in timed)
                for k in range(len(totals[timed[0]]))]
    return {name: [[ms / factor for ms in phases] for phases, factor in zip(rounds, slowness)]
            for name, rounds in results.items()}


def usable_cores() -> list[int]:
    """The CPU cores this process may run on."""
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):  # no affinity on this platform
        return list(range(psutil.cpu_count() or 1))


def _busy_seconds(times) -> float:
    """CPU-seconds a core spent on anything but idling (guest time is already in user time on Linux)."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - times.idle - getattr(times, "iowait", 0.0)


class CpuLoad:
    """How many of this process's cores other processes kept busy during a ``with`` block."""

    def __enter__(self) -> CpuLoad:
        self.cores = usable_cores()
        self._start = self._sample()
        self.others = 0.0
        return self

    def _sample(self) -> tuple[float, float, float]:
        per_core = psutil.cpu_times(percpu=True)
        busy = sum(_busy_seconds(per_core[c]) for c in self.cores if c < len(per_core))
        own = psutil.Process().cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def __exit__(self, *exc) -> None:
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._sample()
        if t1 > t0:
            self.others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def describe(self) -> str:
        return describe_load(self.others, len(self.cores))


def describe_load(others: float, cores: int) -> str:
    return f"other processes kept {others:.1f} of this process's {cores} cores busy"


def idle_cores(probe_seconds: float = PROBE_SECONDS) -> tuple[int, CpuLoad]:
    """How many of this process's cores other processes leave idle (at least 1), watched for ``probe_seconds``."""
    with CpuLoad() as load:
        time.sleep(probe_seconds)
    return max(1, round(len(load.cores) - load.others)), load


def check_threads(threads: int) -> int:
    """``threads`` (``--threads``), if this process may run on that many cores; else an ``HwoptError``."""
    cores = len(usable_cores())
    if not 1 <= threads <= cores:
        raise HwoptError(f"--threads {threads}: this process may use {cores} CPU cores, so give 1 to {cores} "
                         "(--threads none: one per core other processes leave idle)")
    return threads


def oversubscribed(others: float, threads: int, cores: int) -> bool:
    """Whether other processes' load and ``threads`` threads did not fit on ``cores`` cores (half a core spare)."""
    return others + threads > cores + 0.5
