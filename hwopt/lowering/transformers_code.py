"""The nemotron-nas checkpoint as transformers loads it: remote code in the checkpoint, or hwopt's registered classes.

``write_remote_code`` copies ``hwopt/model/modeling_nemotron_nas.py`` (which
imports only torch and transformers) into a checkpoint and points
``config.json``'s ``auto_map`` at it, so ``AutoModelForCausalLM.from_pretrained(
directory, trust_remote_code=True)`` loads it without hwopt.
``register_with_transformers`` registers the same classes with transformers'
Auto classes, so that once hwopt has loaded a model no remote code is needed;
importing this module (as ``hwopt.model_source`` does) calls it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from hwopt.model import modeling_nemotron_nas

REMOTE_CODE = Path(modeling_nemotron_nas.__file__).name  # modeling_nemotron_nas.py
MODULE = REMOTE_CODE.removesuffix(".py")
AUTO_MAP = {"AutoConfig": f"{MODULE}.NemotronNASConfig", "AutoModelForCausalLM": f"{MODULE}.DeciLMForCausalLM"}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def write_remote_code(directory: Path) -> None:
    """Copy the modeling code into a nemotron-nas checkpoint and add its ``auto_map`` to ``config.json``."""
    directory = Path(directory)
    shutil.copyfile(modeling_nemotron_nas.__file__, directory / REMOTE_CODE)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = AUTO_MAP
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def register_with_transformers() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type: nemotron-nas`` with hwopt's classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_class = modeling_nemotron_nas.NemotronNASConfig
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, modeling_nemotron_nas.DeciLMForCausalLM, exist_ok=True)


register_with_transformers()
