"""Shared fixtures: the example third-party plugin, installed once per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig

REPO = Path(__file__).resolve().parents[1]
# fp32 by default on any CPU, in-process and in every command a test starts, so that exact comparisons hold where
# the CPU multiplies bf16 natively too (tests/test_scale.py checks that default on its own)
os.environ["HWOPT_CPU_BF16"] = "0"
JS_PLUGIN_SRC = REPO / "plugins" / "hwopt-js-divergence"
WINDOW_PLUGIN_SRC = REPO / "plugins" / "hwopt-sliding-window"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "installs_plugin: pip-installs an example plugin from plugins/ into a temp dir")
    use_session_cache(config)


def use_session_cache(config) -> None:
    """Point ``HWOPT_CACHE`` at a folder of this session's, so that the tiny models' parent samples and the like
    stay out of the user's cache; the user's SmolLM2 weights and measured CPU roofs are linked in, not redone."""
    from hwopt.pipeline import cache_root

    users = cache_root()
    session = Path(tempfile.mkdtemp(prefix="hwopt-test-cache-"))
    for name in ("smollm2-135m-instruct", "cpu-roofs.json"):  # read-only here: new files replace a link, not its file
        if (users / name).exists():
            (session / name).symlink_to(users / name)
    os.environ["HWOPT_CACHE"] = str(session)
    config.add_cleanup(lambda: shutil.rmtree(session, ignore_errors=True))


def env_with_pythonpath(*paths) -> dict:
    """os.environ with ``paths`` put in front of PYTHONPATH (for subprocesses)."""
    env = dict(os.environ)
    parts = [str(p) for p in paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A command run in-process sets torch's thread count for its run; the next test gets the count back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pip_install_plugin(source: Path, root: Path) -> Path:
    """``pip install --target`` an example plugin; returns the site dir to put on PYTHONPATH.

    The source is copied first so that the in-tree build (build/, *.egg-info)
    does not litter the repository.
    """
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this Python, so the example plugin cannot be installed")
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not available, and the offline (--no-build-isolation) install needs it")
    src, site = root / "src", root / "site"
    shutil.copytree(source, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install of {source.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return site


@pytest.fixture(scope="session")
def installed_js_plugin(tmp_path_factory) -> Path:
    site = pip_install_plugin(JS_PLUGIN_SRC, tmp_path_factory.mktemp("js_plugin"))
    assert (site / "hwopt_js_divergence.py").is_file()
    return site


@pytest.fixture(scope="session")
def installed_window_plugin(tmp_path_factory) -> Path:
    site = pip_install_plugin(WINDOW_PLUGIN_SRC, tmp_path_factory.mktemp("window_plugin"))
    assert (site / "hwopt_sliding_window.py").is_file()
    return site


def plugin_module(path: Path):
    """An example plugin's module, imported from its source file (for registering it in-process)."""
    spec = importlib.util.spec_from_file_location(f"_under_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sliding_window():
    """The hwopt-sliding-window plugin registered in-process (as ``sliding_window``) for one test."""
    from hwopt import plugins

    module = plugin_module(WINDOW_PLUGIN_SRC / "hwopt_sliding_window.py")
    with plugins.registered(module, name="sliding_window"):
        yield module


def make_tiny_llama_dir(directory: Path, seed: int = 0, layers: int = 4) -> Path:
    """A random tiny Llama checkpoint with SmolLM2's tokenizer (so real text tokenises)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hwopt.builtin.model_names import smollm2_weights

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


# A child with a layer of each kind: linear, the parent's, fewer KV heads with a narrower FFN, no-op. The first
# layer has no KV cache, and layer 0 is where a cache's length is usually read.
CHILD_BLOCKS = [
    BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(replace_with_linear=True)),
    BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=256)),
    BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=128)),
    BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True)),
    BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(no_op=True)),
]


def tiny_child(blocks=None, tie=True):
    """A random child with ``blocks`` (default ``CHILD_BLOCKS``), its norms away from 1."""
    import torch
    from transformers import LlamaConfig

    from hwopt.model.modeling import HeteroLlamaForCausalLM
    from hwopt.plugins import block_types

    blocks = blocks or CHILD_BLOCKS
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=len(blocks), num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=211, max_position_embeddings=128,
                         tie_word_embeddings=tie, rope_theta=10000.0, eos_token_id=None, bos_token_id=None)
    model = HeteroLlamaForCausalLM(config, blocks, block_types()).eval()
    with torch.no_grad():  # norms away from 1, so that a norm read from the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_parent(intermediate_size: int, vocab_size: int):
    """A random 4-layer parent (hidden 32, 4 heads, 2 KV heads), untied, every layer the full block."""
    import torch
    from transformers import LlamaConfig

    from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig
    from hwopt.model.modeling import HeteroLlamaForCausalLM
    from hwopt.plugins import block_types

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=vocab_size,
                         tie_word_embeddings=False)
    blocks = [BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=intermediate_size))] * 4
    return HeteroLlamaForCausalLM(config, blocks, block_types()).eval()


# Small budgets that still run every pass for real.
FAST_RUN = ["--scenario", "16/4", "--repeats", "2", "--seq-len", "32", "--bld-tokens", "512", "--distill-samples", "64",
            "--score-tokens", "64", "--uptrain-tokens", "128", "--select-tokens", "128"]


def hwopt_cli(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run the hwopt command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "hwopt", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)
