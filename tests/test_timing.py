"""Timings on a busy machine: interleaved rounds, spread, the bounded re-measure, and how a profile reports noise.

Everything here runs on fake timers, clocks and backends, so it is fast and deterministic.
"""

from __future__ import annotations

import collections
import json
import time
import types

import pytest
import torch

import hwopt.plugins
import hwopt.profiling
import hwopt.run
from hwopt import timing
from hwopt.cli import main
from hwopt.errors import HwoptError
from hwopt.model_source import resolve_model
from hwopt.pipeline import read_manifest
from hwopt.profiling import check_profile, print_checks, profile
from hwopt.search_space import Scenario, SearchSpace
from hwopt.targets import resolve_target
from hwopt.timing import interleaved_rounds, median_error, median_phases, normalized_rounds, spread


def test_every_timer_runs_once_per_round_in_order_and_in_reverse_order_in_turn():
    calls = []
    timers = {name: (lambda name=name: calls.append(name) or [1.0]) for name in "ABC"}
    results = interleaved_rounds(timers, rounds=3, noisy=lambda _: [])
    assert "".join(calls) == "ABCCBAABC"
    assert results == {name: [[1.0]] * 3 for name in "ABC"}


def test_normalized_rounds_take_out_what_slowed_a_whole_round_and_leave_a_pieces_own_scatter():
    """Round 2 ran 1.5x slow for everything; piece C also scatters on its own in round 3; a no-op stays 0."""
    results = {"A": [[1.0, 10.0], [1.5, 15.0], [1.0, 10.0]], "B": [[2.0], [3.0], [2.0]],
               "C": [[4.0], [6.0], [8.0]], "noop": [[0.0], [0.0], [0.0]]}
    normalized = normalized_rounds(results)
    assert normalized["A"] == [[1.0, 10.0], [1.0, 10.0], [1.0, 10.0]] and normalized["B"] == [[2.0], [2.0], [2.0]]
    assert normalized["C"] == [[4.0], [4.0], [8.0]]  # its own scatter is not passed on to A and B
    assert normalized["noop"] == [[0.0]] * 3
    assert median_error([sum(r) for r in normalized["A"]]) == 0 < median_error([sum(r) for r in results["A"]])


def test_spread_is_the_interquartile_range_over_the_median():
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4 - 2) / 3)  # quartiles 2 and 4, median 3
    assert spread([7.0] * 5) == 0.0
    assert spread([0.0, 0.0, 0.0]) == 0.0  # a no-op costs nothing, steadily
    assert median_phases([[1.0, 10.0], [3.0, 30.0], [2.0, 20.0]]) == [2.0, 20.0]


def test_the_medians_standard_error_shrinks_with_rounds_where_the_spread_does_not():
    five = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert median_error(five) == pytest.approx(1.2533 * (2 / 3) / (1.349 * 5 ** 0.5))
    assert spread(five * 4) == pytest.approx(spread(five))  # the same scatter, four times the rounds
    assert median_error(five * 4) == pytest.approx(median_error(five) / 2)
    assert median_error([7.0] * 5) == 0.0 and median_error([0.0, 0.0]) == 0.0


def test_on_normal_draws_the_standard_error_is_the_medians_own_scatter():
    """Over many sets of 9 rounds, the medians scatter about as much as one set's estimate says."""
    generator = torch.Generator().manual_seed(0)
    draws = 100.0 + 10.0 * torch.randn(4000, 9, generator=generator)
    medians = draws.median(dim=1).values
    estimates = torch.tensor([median_error(row.tolist()) for row in draws]) * medians
    assert estimates.median().item() == pytest.approx(medians.std().item(), rel=0.25)


class FakeClock:
    """Each timer call takes one second."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def timer(self):
        def one_round():
            self.now += 1.0
            return [1.0]
        return one_round


def test_noisy_timings_are_measured_again_for_at_most_twice_as_long_as_the_first_rounds():
    clock = FakeClock()
    timers = {"A": clock.timer(), "B": clock.timer()}
    results = interleaved_rounds(timers, rounds=3, noisy=lambda _: ["A"], clock=clock)
    # 3 rounds of two 1 s calls take 6 s; re-measuring may take 12 s more: 6 further rounds
    assert clock.now == 18.0 and len(results["A"]) == len(results["B"]) == 9


def test_re_measuring_stops_once_nothing_is_noisy():
    clock = FakeClock()
    timers = {"A": clock.timer(), "B": clock.timer()}
    results = interleaved_rounds(timers, rounds=3, noisy=lambda r: ["A"] if len(r["A"]) < 5 else [], clock=clock)
    assert len(results["A"]) == len(results["B"]) == 5


def test_cpu_load_counts_what_other_processes_used_of_this_processs_cores(monkeypatch):
    """Over 2 s, cores 0 and 1 were busy 1.5 s and 2 s (core 2 is not ours); this process used 1.5 s of that."""
    Core = collections.namedtuple("Core", "user system idle iowait guest")
    Own = collections.namedtuple("Own", "user system")
    samples = iter([(0.0, [Core(10, 0, 50, 0, 0)] * 3, Own(1.0, 0.0)),
                    (2.0, [Core(11, 0.5, 50.5, 0, 0), Core(12, 0, 50, 0, 0), Core(20, 0, 50, 0, 0)], Own(2.0, 0.5))])
    now = {}

    def fake_times(percpu):
        now["t"], cores, now["own"] = next(samples)
        return cores

    monkeypatch.setattr(timing.psutil, "cpu_times", fake_times)
    monkeypatch.setattr(timing, "usable_cores", lambda: [0, 1])
    monkeypatch.setattr(timing.time, "monotonic", lambda: now["t"])
    monkeypatch.setattr(timing.psutil, "Process", lambda: types.SimpleNamespace(cpu_times=lambda: now["own"]))
    with timing.CpuLoad() as load:
        pass
    assert load.others == pytest.approx((3.5 - 1.5) / 2)
    assert load.describe() == "other processes kept 1.0 of this process's 2 cores busy"


# --- the profile pass on a fake backend ------------------------------------------------------------------------

class FakeBackend:
    """Times every piece at 1 ms a phase; ``swing`` makes alternate rounds slower (noise) for some pieces.

    A swing of 1 spreads a piece by 100% however many rounds it runs; a swing of 0.2 spreads it by 20%, a
    median known to within 4% after 25 rounds.
    """

    measures = True

    def __init__(self, name="fake", swing=0.0, noisy=("kv3", "ffn1536")):
        self.name, self.swing, self.noisy = name, swing, noisy

    def available(self, target, scenario):
        return True, ""

    def describe(self, target, scenario):
        return {"device": "fake device", "backend": "fake", "method": "arithmetic"}

    def prepare(self, workload, target):
        rounds = []
        swing = self.swing if workload.name in self.noisy else 0.0

        def one_round():
            time.sleep(0.002)  # so that the first rounds take long enough to leave time for more
            rounds.append(None)
            return [1.0 + swing * (len(rounds) % 2)] * len(workload.phases)
        return one_round


class FakeLoad:
    """What ``hwopt.timing.CpuLoad`` would see with other processes keeping ``others`` of 2 cores busy."""

    others = 0.0
    cores = [0, 1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def describe(self):
        return timing.describe_load(self.others, len(self.cores))


@pytest.fixture
def fake_backends(monkeypatch):
    """Backends ``quiet`` and ``noisy`` on a machine nobody else uses."""
    registry = hwopt.plugins.Registry("backend", {"quiet": FakeBackend("quiet"), "noisy": FakeBackend("noisy", 1.0),
                                                  "scattered": FakeBackend("scattered", 0.2)})
    monkeypatch.setattr(hwopt.profiling, "backends", lambda: registry)
    monkeypatch.setattr(hwopt.profiling, "CpuLoad", FakeLoad)
    monkeypatch.setattr(FakeLoad, "others", 0.0)


def _profile(tmp_path, backend, **kwargs):
    return profile(resolve_model("smollm2-135m"), resolve_target("cpu"), Scenario.parse("16/4"), SearchSpace(),
                   backend, 4, tmp_path / "costs.json", **kwargs)


def test_every_measured_figure_carries_its_rounds_and_spread(tmp_path, fake_backends):
    costs = _profile(tmp_path, "quiet")
    assert json.loads((tmp_path / "costs.json").read_text()) == costs
    for entry in [*costs["attention"].values(), *costs["ffn"].values(), costs["outside_layers"]]:
        assert entry["rounds"] == 4
        assert entry["spread"] == entry["median_error"] == {"prefill_ms": 0.0, "decode_ms": 0.0, "runtime_ms": 0.0}
    checks = costs["checks"]
    assert checks["problems"] == [] and checks["noise_bound"] == {"median_error": 0.04}
    assert checks["self_check"] == {"skipped": "the end-to-end check runs torch on the CPU, not quiet on cpu"}


@pytest.mark.parametrize("others, failed", [(0.0, False), (0.4, True)])
def test_a_profile_that_stays_noisy_says_so_in_one_line(tmp_path, fake_backends, monkeypatch, others, failed):
    """On a quiet machine noise is a warning (measuring again would scatter as much); with other processes busy
    it is a failed check."""
    monkeypatch.setattr(FakeLoad, "others", others)
    costs = _profile(tmp_path, "noisy")
    [line] = costs["checks"]["problems" if failed else "warnings"]
    assert costs["checks"]["warnings" if failed else "problems"] == []
    assert line.startswith("timings stayed noisy after ")
    assert "kv3 " in line and "ffn1536 " in line and "kv1" not in line and "bound 4%" in line
    assert "the median's standard error" in line
    assert "other processes kept" in line
    assert costs["attention"]["kv3"]["rounds"] > 4  # measured again before giving up
    assert costs["attention"]["kv3"]["spread"]["runtime_ms"] > 0.1 and costs["attention"]["kv1"]["spread"] == {
        "prefill_ms": 0.0, "decode_ms": 0.0, "runtime_ms": 0.0}


def test_a_machine_too_busy_for_the_timing_threads_is_named(tmp_path, fake_backends, monkeypatch):
    monkeypatch.setattr(FakeLoad, "others", 1.9)
    torch.set_num_threads(1)
    costs = _profile(tmp_path, "quiet")
    assert costs["checks"]["problems"] == [
        "the machine is too busy to measure: other processes kept 1.9 of this process's 2 cores busy beside the "
        "profile's 1 timing thread"]
    assert costs["checks"]["other_busy_cores"] == 1.9 and costs["checks"]["threads"] == 1
    with pytest.raises(HwoptError, match="--max-spread 0.5: the machine is too busy to measure"):
        _profile(tmp_path, "quiet", max_spread=0.5)
    monkeypatch.setattr(FakeLoad, "others", 1.0)  # one core busy: the profile's one thread still has its own
    assert _profile(tmp_path, "quiet")["checks"]["problems"] == []


def test_a_scattered_figure_whose_median_more_rounds_pin_down_passes(tmp_path, fake_backends, monkeypatch):
    monkeypatch.setattr(hwopt.profiling, "interleaved_rounds",  # time for enough rounds on the fake backend
                        lambda *a, **k: interleaved_rounds(*a, **k, extra_time_factor=100.0))
    costs = _profile(tmp_path, "scattered")
    kv3 = costs["attention"]["kv3"]
    assert kv3["spread"]["runtime_ms"] > 0.1  # still scattered round to round, as on a quiet two-thread CPU
    assert kv3["median_error"]["runtime_ms"] <= 0.04 and kv3["rounds"] > 4
    assert costs["checks"]["problems"] == []
    with pytest.raises(HwoptError, match=r"--max-spread 0.1: timings stayed noisy .*kv3 \d+%.*\(spread = IQR"):
        _profile(tmp_path, "scattered", max_spread=0.1)  # a bound on the spread is stricter


def test_max_spread_makes_noise_an_error(tmp_path, fake_backends):
    with pytest.raises(HwoptError, match=r"--max-spread 0.2: timings stayed noisy .*kv3 \d+%"):
        _profile(tmp_path, "noisy", max_spread=0.2)
    assert not (tmp_path / "costs.json").exists()
    assert _profile(tmp_path, "noisy", max_spread=10.0)["checks"]["problems"] == []  # a bound it stays within


def test_a_profile_that_failed_its_checks_is_measured_again_and_force_reruns_a_good_one(tmp_path, fake_backends,
                                                                                          capsys, monkeypatch):
    workdir = str(tmp_path / "run")
    args = ["profile", "--workdir", workdir, "--scenario", "16/4", "--repeats", "3", "--threads", "1"]
    monkeypatch.setattr(FakeLoad, "others", 0.4)  # busy enough that noise may be the load's, room for the thread
    assert main([*args, "--backend", "noisy"]) == 0
    err = capsys.readouterr().err
    assert "profile: warning: timings stayed noisy" in err and "not recorded as up to date" in err
    assert read_manifest(tmp_path / "run/profile")["failed_checks"]
    assert main(args) == 0
    assert "up to date, skipped" not in capsys.readouterr().err  # measured again

    assert main([*args, "--backend", "quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(args) == 0
    assert "profile: up to date, skipped" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert "up to date" not in capsys.readouterr().err


def test_a_profile_noisy_on_a_quiet_machine_is_kept_with_a_warning_and_not_measured_again(tmp_path, fake_backends,
                                                                                           capsys):
    args = ["profile", "--workdir", str(tmp_path / "run"), "--scenario", "16/4", "--repeats", "3", "--threads", "2",
            "--backend", "noisy"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "profile: warning: timings stayed noisy" in err and "kept all the same" in err
    assert "not recorded as up to date" not in err and not read_manifest(tmp_path / "run/profile").get("failed_checks")
    assert main(args) == 0
    assert "profile: up to date, skipped" in capsys.readouterr().err


def test_max_spread_on_the_command_line(tmp_path, fake_backends, capsys):
    args = ["profile", "--workdir", str(tmp_path / "run"), "--scenario", "16/4", "--repeats", "3", "--threads", "2"]
    assert main([*args, "--backend", "noisy", "--max-spread", "0.25"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("hwopt: error: --max-spread 0.25: timings stayed noisy")
    assert err.count("hwopt: error") == 1 and "Traceback" not in err
    assert main([*args, "--backend", "quiet", "--max-spread", "0"]) == 2
    assert "--max-spread must be a positive fraction" in capsys.readouterr().err


def test_a_whole_model_off_the_sum_of_its_blocks_is_a_failed_check():
    check = {"end_to_end_ms": 130.0, "blocks_ms": 100.0, "ratio": 1.3, "bound": 0.15, "ok": False}
    costs = {"attention": {}, "ffn": {}, "outside_layers": {"rounds": 5, "spread": {"runtime_ms": 0.01}}}
    [line], [] = check_profile(costs, check, FakeLoad(), 2, max_spread=None)
    assert line.startswith("the whole model took 130.0 ms end to end, the sum of its blocks 100.0 ms (ratio 1.30")


def test_the_self_check_ratio_is_recorded(tmp_path, tiny_llama_dir, capsys):
    torch.set_num_threads(1)  # one thread holds up on a busy machine (see README)
    parent_blocks_only = SearchSpace(kv_heads=(2,), ffn_fractions=(), linear=False, no_op=False)
    costs = profile(resolve_model(str(tiny_llama_dir)), resolve_target("cpu"), Scenario.parse("8/2"),
                    parent_blocks_only, "torch", 2, tmp_path / "costs.json")
    check = json.loads((tmp_path / "costs.json").read_text())["checks"]["self_check"]
    assert check == costs["checks"]["self_check"]
    assert check["end_to_end_ms"] > 0 and check["blocks_ms"] > 0 and check["bound"] == 0.15
    assert check["ratio"] == pytest.approx(check["end_to_end_ms"] / check["blocks_ms"])
    assert check["ok"] == (abs(check["ratio"] - 1) <= 0.15)
    print_checks(costs)
    assert f"(ratio {check['ratio']:.3f})" in capsys.readouterr().err


def test_a_run_keeps_the_thread_count_its_first_command_chose(tmp_path, monkeypatch, capsys):
    load = FakeLoad()
    load.others = 1.0
    monkeypatch.setattr(hwopt.run, "idle_cores", lambda: (1, load))
    run = hwopt.run.Run(tmp_path, hwopt.run.Settings())
    run.use_threads()
    assert torch.get_num_threads() == 1 and run.settings.threads == 1
    assert "threads: 1 (other processes kept 1.0 of this process's 2 cores busy)" in capsys.readouterr().err
    cores = len(timing.usable_cores())
    for threads in (0, cores + 1):
        with pytest.raises(HwoptError, match=f"--threads {threads}: this process may use {cores} CPU cores, so give "
                                             f"1 to {cores}"):
            hwopt.run.Run(tmp_path, hwopt.run.Settings(threads=threads)).use_threads()
