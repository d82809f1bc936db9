"""`hwopt evaluate`: a child against its parent, on a tiny random model (a layer's FFN removed, one attention
made linear), in-process."""

from __future__ import annotations

import json

import pytest
import torch

from hwopt.cli import main
from hwopt.evaluate import compare_on_heldout
from hwopt.model.checkpoint import load_checkpoint, save_nemotron_nas
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.model_source import resolve_model
from hwopt.plugins import block_types
from hwopt.report import report_rows, speedup_line

FAST = ["--scenario", "8/4", "--repeats", "1", "--seq-len", "16", "--tokens", "64"]


@pytest.fixture(scope="module")
def tiny_child_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny parent with layer 1's FFN removed and layer 2's attention replaced by a linear layer."""
    source = resolve_model(str(tiny_llama_dir))
    parent = source.load()
    blocks = list(parent.block_configs)
    blocks[1] = BlockConfig(blocks[1].attention, FFNConfig(no_op=True))
    blocks[2] = BlockConfig(AttentionConfig(replace_with_linear=True), blocks[2].ffn)
    child = HeteroLlamaForCausalLM(parent.config, blocks, parent.block_types)
    torch.manual_seed(0)
    state = child.state_dict()
    state.update({k: v for k, v in parent.state_dict().items() if k in state and v.shape == state[k].shape})
    child.load_state_dict(state)
    directory = tmp_path_factory.mktemp("tiny_child")
    save_nemotron_nas(child, directory, source.tokenizer())
    return directory


def test_evaluate_writes_report_with_every_figure(tiny_child_dir, tiny_llama_dir, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"question": f"Is {n} even?", "choices": ["yes", "no"],
                                          "answer": n % 2}) for n in range(6)))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_child_dir), "--parent", str(tiny_llama_dir), "--out", str(out),
                 "--task-data", str(task), "--threads", "1", *FAST]) == 0
    assert torch.get_num_threads() == 1
    report = json.loads((out / "evaluation.json").read_text())
    assert set(report["texts"]) == {"heldout", "general"}
    child, parent = load_checkpoint(tiny_child_dir, block_types()), load_checkpoint(tiny_llama_dir, block_types())
    for q in report["texts"].values():
        assert q["kl_div"] > 0 and 0 <= q["top1_agreement"] < 1 and q["perplexity"] > 1
    general = report["texts"]["general"]
    from hwopt.data import general_heldout

    ids = general_heldout(resolve_model(str(tiny_llama_dir)).tokenizer(), 16)
    assert general["tokens"] == ids.numel()
    assert general["kl_div"] == pytest.approx(compare_on_heldout(child, parent, ids)["kl_div"], rel=1e-4)
    assert report["child"]["params"] < report["parent"]["params"]
    assert report["child"]["weights_mib"] < report["parent"]["weights_mib"]
    # one layer's attention is linear: its KV cache is gone, so the child's is 3/4 of the parent's
    assert report["child"]["kv_cache_mib"] == pytest.approx(report["parent"]["kv_cache_mib"] * 3 / 4)
    assert report["measured_speedup"] > 0 and report["predicted_speedup"] > 1
    assert report["parent"]["tokens_per_s"] == pytest.approx(1 * 12 / report["parent"]["runtime_ms_measured"] * 1e3)
    for role in ("parent", "child"):
        assert any(report[role]["task_accuracy"] == pytest.approx(n / 6) for n in range(7))
    assert report["predicted_on"] == "cpu (estimated)" and report["predicted_by"].startswith("estimated for ")
    assert max(len(row[0]) for row in report_rows(report)) < 60  # each row's label, as the table shows it
    assert len(speedup_line(report)) < 200
    markdown = (out / "report.md").read_text()
    assert "general English" in markdown and "per_layer.png" in markdown and "task accuracy" in markdown
    assert (out / "per_layer.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--tokens", "8"], "--tokens 8 must hold at least one sequence"),
    (["--data", "no/such/file.txt"], "data file no/such/file.txt does not exist"),
    (["--threads", "9999"], "--threads 9999: this process may use"),
    (["--threads", "0"], "--threads 0: this process may use"),
])
def test_evaluate_bad_input_is_one_error_line(tiny_child_dir, tiny_llama_dir, tmp_path, capsys, args, message):
    code = main(["evaluate", "--model", str(tiny_child_dir), "--parent", str(tiny_llama_dir),
                 "--out", str(tmp_path / "e"), "--seq-len", "16", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "e").exists()


def test_a_measured_speedup_says_how_busy_other_processes_kept_the_cores(tiny_child_dir, tiny_llama_dir):
    from hwopt.evaluate import measured_speedup
    from hwopt.search_space import Scenario

    child, parent = load_checkpoint(tiny_child_dir, block_types()), load_checkpoint(tiny_llama_dir, block_types())
    check = measured_speedup(parent, child, Scenario(input_len=8, output_len=2), repeats=2)
    assert check["measured_speedup"] > 0 and check["error"] >= 0
    assert check["others"] >= 0 and isinstance(check["disturbed"], bool)
