"""Targets: shipped ones by name or alias, a user's TOML file, and the errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hwopt.errors import HwoptError
from hwopt.targets import resolve_target, shipped_targets


@pytest.mark.parametrize("target, name", [
    ("h100-sxm", "h100-sxm"), ("h100", "h100-sxm"), ("H100", "h100-sxm"),
    ("rtx-4090", "rtx-4090"), ("4090", "rtx-4090"),
    ("a100", "a100-80gb"), ("a100-80gb", "a100-80gb"),
    ("cpu", "cpu"), ("host", "cpu"),
])
def test_resolve_by_name_and_alias(target, name):
    assert resolve_target(target).name == name


def test_gpu_targets_carry_their_specs():
    h100 = resolve_target("h100")
    assert h100.kind == "gpu"
    assert h100.memory_gib == pytest.approx(74.5) and h100.bandwidth_gbs == 3350
    assert h100.peak_tflops["bf16"] == 989 and "fp8" in h100.peak_tflops
    assert any("H100" in n for n in h100.nvml_names)
    assert "fp8" not in resolve_target("a100").peak_tflops  # no fp8 on Ampere
    assert {t.name for t in shipped_targets()} == {"cpu", "h100-sxm", "h200-sxm", "a100-80gb", "rtx-4090"}
    assert resolve_target("h200").memory_gib == pytest.approx(141e9 / 2**30, abs=0.05)


def test_cpu_target_describes_this_machine():
    cpu = resolve_target("cpu")
    assert cpu.kind == "cpu"
    expected_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert cpu.memory_gib == pytest.approx(expected_gib, abs=0.1)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        mem_total = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal"))
        total_kib = int(mem_total.split()[1])
        assert cpu.memory_gib == pytest.approx(total_kib / 2**20, rel=0.01)
    assert f"{len(os.sched_getaffinity(0))} cores available" in cpu.description
    assert "memory_gib" in cpu.sources


def test_a_user_toml_target(tmp_path):
    path = tmp_path / "my-gpu.toml"
    path.write_text('name = "my-gpu"\nkind = "gpu"\ndescription = "a lab card"\naliases = ["mine"]\n'
                    'memory_gib = 40.0\nbandwidth_gbs = 1500\n\n[peak_tflops]\nbf16 = 200\n')
    target = resolve_target(str(path))
    assert target.name == "my-gpu" and target.kind == "gpu" and target.description == "a lab card"
    assert target.aliases == ("mine",)
    assert target.memory_gib == 40.0 and target.bandwidth_gbs == 1500 and target.peak_tflops == {"bf16": 200}


def test_a_user_toml_lacking_a_field_or_malformed(tmp_path):
    path = tmp_path / "incomplete.toml"
    path.write_text('name = "x"\n')
    with pytest.raises(HwoptError, match="lacks the field 'kind'"):
        resolve_target(str(path))
    path.write_text('name = \n')
    with pytest.raises(HwoptError, match="cannot read target file"):
        resolve_target(str(path))


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(HwoptError) as info:
        resolve_target("tpu-v5")
    message = str(info.value)
    assert "'tpu-v5'" in message
    for name in ("cpu", "h100-sxm", "a100-80gb", "rtx-4090"):
        assert name in message


def test_missing_toml_file(tmp_path):
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(HwoptError, match="does not exist") as info:
        resolve_target(str(missing))
    assert str(missing) in str(info.value)
