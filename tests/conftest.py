"""Shared fixtures: the example third-party plugin, installed once per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JS_PLUGIN_SRC = REPO / "plugins" / "hwopt-js-divergence"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "installs_plugin: pip-installs the example plugin plugins/hwopt-js-divergence into a temp dir")


def env_with_pythonpath(*paths) -> dict:
    """os.environ with ``paths`` put in front of PYTHONPATH (for subprocesses)."""
    env = dict(os.environ)
    parts = [str(p) for p in paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


@pytest.fixture(scope="session")
def installed_js_plugin(tmp_path_factory) -> Path:
    """``pip install --target`` the example plugin once; returns the site dir to put on PYTHONPATH.

    The source is copied first so that the in-tree build (build/, *.egg-info)
    does not litter the repository.
    """
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this Python, so the example plugin cannot be installed")
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not available, and the offline (--no-build-isolation) install needs it")
    root = tmp_path_factory.mktemp("js_plugin")
    src, site = root / "src", root / "site"
    shutil.copytree(JS_PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install of the example plugin failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "hwopt_js_divergence.py").is_file()
    return site
