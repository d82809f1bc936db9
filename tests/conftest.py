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


def make_tiny_llama_dir(directory: Path, seed: int = 0, layers: int = 4) -> Path:
    """A random tiny Llama checkpoint with SmolLM2's tokenizer (so real text tokenises)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hwopt.builtin.models import smollm2_weights

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(smollm2_weights()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


# Small budgets that still run every pass for real.
FAST_RUN = ["--scenario", "16/4", "--repeats", "2", "--seq-len", "32", "--bld-tokens", "512", "--distill-samples", "64",
            "--score-tokens", "64", "--uptrain-tokens", "128"]


def hwopt_cli(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run the hwopt command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "hwopt", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)
