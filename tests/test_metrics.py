"""Replace-1-block metrics: each against a hand computation, the task metric, the cached forward, the CLI."""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_RUN, tiny_parent

from hwopt import plugins
from hwopt.chunked_kl import CHUNK_ROWS
from hwopt.cli import main
from hwopt.errors import HwoptError
from hwopt.metric import Outputs, kl_divergence
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig
from hwopt.model.modeling import DecoderLayer
from hwopt.plugins import block_types
from hwopt.run import Run, load_settings
from hwopt.scoring import outputs_of, replace_one_block, swapped_logits
from hwopt.tasks import choice_loglikelihoods, read_task, task_accuracy


def metric(name: str):
    return plugins.metrics().get(name)


def outputs(logits=None, hidden=None, labels=None) -> Outputs:
    """Outputs with whatever the test does not care about filled in."""
    tokens = len(next(t for t in (logits, hidden, labels) if t is not None))
    return Outputs(logits if logits is not None else torch.zeros(tokens, 3),
                   hidden if hidden is not None else torch.zeros(tokens, 2),
                   labels if labels is not None else torch.full((tokens,), -100))


# --- each metric against a hand computation ------------------------------------------------------

def test_directions():
    lower = {"kl_div", "lm_loss", "cosine"}
    higher = {"top1_agreement", "top5_agreement", "task_accuracy"}
    for name in lower | higher:
        assert metric(name).higher_is_better == (name in higher), name
    assert set(getattr(metric("task_accuracy"), "needs", ())) == {"task"}


def test_kl_div():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(5, 7), torch.randn(5, 7)
    assert metric("kl_div").compute(outputs(p_logits), outputs(p_logits)) == 0
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)  # student p, teacher q: KL(q || p)
    by_hand = (q * (q.log() - p.log())).sum(-1).mean().item()
    assert metric("kl_div").compute(outputs(p_logits), outputs(q_logits)) == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("rows", [1, CHUNK_ROWS, 3 * CHUNK_ROWS + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_equals_plain_autograd_in_value_and_gradient(rows, dtype):
    torch.manual_seed(rows)
    student, teacher = (torch.randn(rows, 300) * 4).to(dtype), (torch.randn(rows, 300) * 4).to(dtype)
    chunked_student = student.clone().requires_grad_(True)
    plain_student = student.float().requires_grad_(True)
    chunked = kl_divergence(chunked_student, teacher.requires_grad_(True))
    plain = F.kl_div(F.log_softmax(plain_student, -1), F.log_softmax(teacher.detach().float(), -1), log_target=True,
                     reduction="batchmean")
    (2 * chunked).backward()
    (2 * plain).backward()
    assert chunked.dtype == torch.float32 and chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert chunked_student.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2 / rows  # bf16 keeps 8 bits of the gradient
    torch.testing.assert_close(chunked_student.grad.float(), plain_student.grad, rtol=1e-2, atol=tolerance)
    assert teacher.grad is None


def test_chunked_kl_refuses_logits_of_different_shapes():
    with pytest.raises(ValueError, match=r"\[rows, vocab\]"):
        kl_divergence(torch.zeros(4, 10), torch.zeros(4, 11))
    with pytest.raises(ValueError, match=r"\[rows, vocab\]"):
        kl_divergence(torch.zeros(2, 4, 10), torch.zeros(2, 4, 10))


def test_lm_loss_is_the_students_cross_entropy_on_known_labels():
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    labels = torch.tensor([2, 5, -100, 0])
    by_hand = -(logits.log_softmax(-1)[[0, 1, 3], [2, 5, 0]]).mean().item()
    teacher = outputs(torch.randn(4, 6), labels=labels)  # the teacher plays no part
    assert metric("lm_loss").compute(outputs(logits, labels=labels), teacher) == pytest.approx(by_hand, rel=1e-6)
    assert by_hand == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_cosine_distance():
    teacher = outputs(hidden=torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))
    same = outputs(hidden=teacher.hidden * 5)  # scale does not matter
    assert metric("cosine").compute(same, teacher) == pytest.approx(0, abs=1e-7)
    # distances 1 (orthogonal), 2 (opposite), 1 - 4/5 (between (3, 4) and (0, 1))
    student = outputs(hidden=torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]]))
    assert metric("cosine").compute(student, teacher) == pytest.approx((1 + 2 + 0.2) / 3, rel=1e-6)


def test_top_k_agreement():
    teacher = outputs(torch.tensor([[9.0, 0, 0, 0, 0, 0, 0],     # parent's top-1: token 0
                                    [0, 0, 0, 0, 0, 0, 9.0],     # token 6
                                    [0, 0, 9.0, 0, 0, 0, 0]]))   # token 2
    ranks = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1],               # token 0 is the student's 1st choice
                          [7.0, 6, 5, 4, 3, 2, 1],               # token 6 is its 7th
                          [1.0, 7, 2, 6, 5, 4, 3]])              # token 2 is its 6th
    student = outputs(ranks)
    assert metric("top1_agreement").compute(student, teacher) == pytest.approx(1 / 3)
    assert metric("top5_agreement").compute(student, teacher) == pytest.approx(1 / 3)
    student.logits[2, 2] = 5.5  # now its 3rd choice
    assert metric("top5_agreement").compute(student, teacher) == pytest.approx(2 / 3)
    assert metric("top1_agreement").compute(teacher, teacher) == 1


# --- the task metric ------------------------------------------------------------------------------

VOCAB = 128


def char_tokenizer(text, add_special_tokens=False):
    """One token per (ASCII) character: the test can say which tokens a choice has."""
    return {"input_ids": [ord(c) for c in text]}


def bigram_model(table: torch.Tensor):
    """Logits that depend only on the current token: ``table[token]``."""
    return lambda ids: table[ids]


QUESTIONS = [
    {"question": "Q: x?", "choices": ["aaa", "bcd", "zz"], "answer": 0},
    {"question": "Q: y?", "choices": ["bb", "aa"], "answer": "aa"},
    {"question": "Q: z?", "choices": ["a", "bcd"], "answer": 1},  # the model below gets this one wrong
    {"question": "Q: w\n", "choices": ["ca", "a", "cb", "bbb"], "answer": "a"},
]


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n\n")
    return path


def test_choice_loglikelihoods_by_hand(task_file):
    torch.manual_seed(0)
    table = torch.randn(VOCAB, VOCAB)
    task = read_task(str(task_file), char_tokenizer)
    assert task.num_choices == [3, 2, 2, 4] and task.answers.tolist() == [0, 1, 1, 1]
    expected, right = [], 0
    for q in QUESTIONS:
        scores = []
        for choice in q["choices"]:
            joiner = "" if q["question"].endswith("\n") else " "
            prompt, tokens = q["question"], [ord(c) for c in q["question"] + joiner + choice]
            scores.append(sum(table[tokens[t - 1]].log_softmax(-1)[tokens[t]].item()
                              for t in range(len(prompt), len(tokens))))
        expected += scores
        answer = q["answer"] if isinstance(q["answer"], int) else q["choices"].index(q["answer"])
        right += max(range(len(scores)), key=scores.__getitem__) == answer
    # batches of 2 rows cut across questions; the result does not depend on it
    for batch in (2, 16):
        got = choice_loglikelihoods(bigram_model(table), task, batch=batch)
        assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert task_accuracy(bigram_model(table), task) == pytest.approx(right / len(QUESTIONS))


def test_task_accuracy_of_a_model_that_prefers_one_token(task_file):
    table = torch.zeros(VOCAB, VOCAB)
    table[:, ord("a")] = 20.0  # every next token is "a", almost surely
    task = read_task(str(task_file), char_tokenizer)
    # the choice with the fewest tokens that are not "a" wins: right on 3 of the 4 questions
    assert task_accuracy(bigram_model(table), task) == pytest.approx(3 / 4)
    student = Outputs(torch.zeros(1, VOCAB), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                      model=bigram_model(table), task=task)
    assert metric("task_accuracy").compute(student, student) == pytest.approx(3 / 4)


@pytest.mark.parametrize("line, needle", [
    ("not json", "each line must be"),
    ('["a list"]', "each line must be"),
    ('{"question": "q", "choices": ["a", "b"]}', "each line must be"),
    ('{"question": "", "choices": ["a", "b"], "answer": 0}', "non-empty question"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
    ('{"question": "q", "choices": ["a", 3], "answer": 0}', "at least two non-empty choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer 2 is neither"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "answer 'c' is neither"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "answer True is neither"),
])
def test_malformed_task_line_names_file_and_line(line, needle, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + line + "\n")
    with pytest.raises(HwoptError, match=f"{path}:2: .*{needle}"):
        read_task(str(path), char_tokenizer)


def test_missing_or_empty_task_file(tmp_path):
    with pytest.raises(HwoptError, match="does not exist"):
        read_task(str(tmp_path / "nope.jsonl"), char_tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HwoptError, match="holds no questions"):
        read_task(str(tmp_path / "empty.jsonl"), char_tokenizer)


# --- the replace-1-block forward from cached activations -------------------------------------------


class OneVariant:
    """A library offering one layer: what ``replace_one_block`` asks of a ``Library``."""

    def __init__(self, layer):
        self.layer = layer

    def layers(self, i, pairs, parent_layer):
        yield "a", "f", self.layer


def swapped_outputs(parent, i, layer, ids):
    """(teacher, student) as the score pass sees them, the student with layer ``i`` swapped for ``layer``."""
    head = parent.output_head()
    [(group, parent_out, carried)] = replace_one_block(parent, OneVariant(layer), ids, {i: [("a", "f")]}, 1 << 20)
    assert group == [i]
    teacher = outputs_of(parent_out, head, ids, partial(swapped_logits, parent), None)
    return teacher, outputs_of(carried[(i, "a", "f")], head, ids, partial(swapped_logits, parent, swap=(i, layer)),
                               None)


@torch.no_grad()
@pytest.mark.parametrize("i", [0, 2, 3])
def test_swapped_forward_carried_past_the_layer_equals_the_assembled_model(i):
    parent = tiny_parent(64, VOCAB)
    layer = DecoderLayer(parent.config, BlockConfig(AttentionConfig(replace_with_linear=True),
                                                    FFNConfig(intermediate_size=16)), block_types()).eval()
    assembled = copy.deepcopy(parent)
    assembled.model.layers[i] = layer
    forwards = []
    parent.model.embed_tokens.register_forward_hook(lambda *_: forwards.append(1))
    heldout, other = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (3, 5))
    teacher, student = swapped_outputs(parent, i, layer, heldout)
    assert len(forwards) == 1  # the teacher and the student share one pass over the parent's layers
    assert torch.allclose(student.logits, assembled(heldout).logits.flatten(0, 1), atol=1e-5)
    assert torch.allclose(student.hidden, assembled.model.norm(assembled(heldout, output_hidden_states=True)
                                                               .hidden_states[-1]).flatten(0, 1), atol=1e-5)
    assert student.labels.tolist() == [*heldout[0, 1:].tolist(), -100, *heldout[1, 1:].tolist(), -100]
    assert torch.allclose(student.model(other), assembled(other).logits, atol=1e-5)  # a task metric's own inputs
    assert torch.allclose(teacher.logits, parent(heldout).logits.flatten(0, 1), atol=1e-6)
    assert torch.allclose(teacher.model(other), parent(other).logits, atol=1e-6)


@torch.no_grad()
def test_swapping_in_the_parents_own_layer_scores_as_the_parent():
    parent = tiny_parent(64, VOCAB)
    ids = torch.randint(0, VOCAB, (2, 9))
    teacher, student = swapped_outputs(parent, 1, parent.model.layers[1], ids)
    assert metric("kl_div").compute(student, teacher) == pytest.approx(0, abs=1e-6)
    assert metric("cosine").compute(student, teacher) == pytest.approx(0, abs=1e-6)
    assert metric("top1_agreement").compute(student, teacher) == 1
    assert metric("lm_loss").compute(student, teacher) == pytest.approx(
        F.cross_entropy(parent(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item(), rel=1e-5)


# --- through the command line ------------------------------------------------------------------------

def one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hwopt: error:")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("content, needle", [
    (None, "task data file {path} does not exist"),
    ('{"question": "q", "choices": ["a", "b"]}\n', "{path}:1: each line must be"),
])
def test_bad_task_data_is_one_error_line_before_any_pass(content, needle, tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "task.jsonl"
    if content is not None:
        path.write_text(content)
    workdir = tmp_path / "run"
    code = main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir), "--speedup", "1.2",
                 *FAST_RUN, "--metric", "task_accuracy", "--task-data", str(path)])
    assert code == 2
    assert needle.format(path=path) in one_error_line(capsys)
    assert not (workdir / "profile").exists()


def test_task_metric_without_task_data_is_one_error_line(tiny_llama_dir, tmp_path, capsys):
    code = main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(tmp_path), "--speedup", "1.2",
                 *FAST_RUN, "--metric", "kl_div", "--metric", "task_accuracy"])
    assert code == 2
    assert "metric task_accuracy needs --task-data" in one_error_line(capsys)


def test_score_pass_with_several_metrics(tiny_llama_dir, tmp_path, task_file):
    workdir = tmp_path / "run"
    metrics = ["lm_loss", "cosine", "top5_agreement", "task_accuracy"]
    code = main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir), "--until", "score",
                 *FAST_RUN, *(arg for m in metrics for arg in ("--metric", m)), "--task-data", str(task_file)])
    assert code == 0
    library = json.loads((workdir / "score/block_library.json").read_text())
    run = Run(workdir, load_settings(workdir, {}))
    ids = run.split.score_batches(run.settings.score_tokens)
    with torch.no_grad():
        parent_loss = F.cross_entropy(run.parent(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
        parent_accuracy = task_accuracy(lambda x: run.parent(x).logits, run.task)
    for variants in library.values():
        for entry in variants.values():
            assert set(entry["metrics"]) == set(metrics)
            assert entry["metrics"]["cosine"] >= -1e-6 and math.isfinite(entry["metrics"]["lm_loss"])
            assert 0 <= entry["metrics"]["top5_agreement"] <= 1 and 0 <= entry["metrics"]["task_accuracy"] <= 1
        parent = next(e for e in variants.values() if e["parent"])["metrics"]
        assert parent["cosine"] == pytest.approx(0, abs=1e-6) and parent["top5_agreement"] == 1
        assert parent["lm_loss"] == pytest.approx(parent_loss, rel=1e-5)
        assert parent["task_accuracy"] == pytest.approx(parent_accuracy)


def test_decoupled_scoring_runs_halves_and_estimates_pairs_to_first_order(tiny_llama_dir, tmp_path):
    workdir = tmp_path / "run"
    assert main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir), "--until", "score",
                 *FAST_RUN, "--metric", "kl_div", "--metric", "lm_loss"]) == 0
    decoupled = json.loads((workdir / "score/block_library.json").read_text())
    assert main(["score", "--workdir", str(workdir), "--score-pairs", "coupled"]) == 0
    coupled = json.loads((workdir / "score/block_library.json").read_text())
    for layer, variants in decoupled.items():
        own = next(e for e in variants.values() if e["parent"])
        run_here = {(e["attention"], e["ffn"]) for e in variants.values() if e["scored"] == "replace-1-block"}
        attention = {e["attention"] for e in variants.values()}
        ffn = {e["ffn"] for e in variants.values()}
        assert run_here == {(a, own["ffn"]) for a in attention} | {(own["attention"], f) for f in ffn}
        assert own["metrics"]["kl_div"] == 0
        for name, entry in variants.items():
            exact = coupled[layer][name]
            assert exact["scored"] == "replace-1-block"
            if entry["scored"] == "replace-1-block":  # the same forward, the same figure
                assert entry["metrics"] == pytest.approx(exact["metrics"], rel=1e-5, abs=1e-7)
            else:
                a_part = variants[f"{entry['attention']}+{own['ffn']}"]["metrics"]
                f_part = variants[f"{own['attention']}+{entry['ffn']}"]["metrics"]
                for m in ("kl_div", "lm_loss"):
                    assert entry["metrics"][m] == pytest.approx(a_part[m] + f_part[m] - own["metrics"][m])


def test_coupled_bld_trains_the_chosen_pairs_and_solves_again(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from hwopt.bld import coupled_subspace

    workdir = tmp_path / "run"
    assert main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir), "--until", "uptrain",
                 "--speedup", "1.3", *FAST_RUN, "--coupled-bld", "2"]) == 0
    decoupled = json.loads((workdir / "solve/decoupled_solutions.json").read_text())
    scored = json.loads((workdir / "score/block_library.json").read_text())
    parent_choice = [next((e["attention"], e["ffn"]) for e in v.values() if e["parent"]) for v in scored.values()]
    subspace = coupled_subspace([s["variants"] for s in decoupled["solutions"]], parent_choice)
    assert subspace, "the decoupled solutions chose something other than the parent"
    index = json.loads((workdir / "solve/coupled/index.json").read_text())
    library = json.loads((workdir / "solve/block_library.json").read_text())
    for i, pairs in subspace.items():
        for a, f in pairs:
            entry = library[f"layer_{i}"][f"{a}+{f}"]
            assert entry["coupled"] and entry["scored"] == "replace-1-block"
            if f"{a}+{f}" in index.get(f"layer_{i}", {}):
                bld = index[f"layer_{i}"][f"{a}+{f}"]["bld"]
                assert bld["kept"] == (bld["final_nmse"] <= bld["init_nmse"])
    coupled_names = {(int(layer.split("_")[1]), name) for layer, pairs in index.items() for name in pairs}
    assert coupled_names == {(i, f"{a}+{f}") for i, pairs in subspace.items() for a, f in pairs
                             if not (a.endswith("noop") and f.endswith("noop"))}
    uncoupled = {(i, n) for i, layer in enumerate(library.values()) for n, e in layer.items() if not e.get("coupled")}
    assert all(library[f"layer_{i}"][n] == scored[f"layer_{i}"][n] for i, n in uncoupled)
    run = Run(workdir, load_settings(workdir, {}))
    for i, name in sorted(coupled_names):
        a, f = name.split("+")
        layer = run.library().layer(i, a, f)
        saved = load_file(workdir / "solve/coupled" / index[f"layer_{i}"][name]["weights"])
        assert all(torch.equal(v, saved[k]) for k, v in layer.state_dict().items())
        plain = run.library(coupled=False).layer(i, a, f).state_dict()
        changed = any(not torch.equal(v, plain[k]) for k, v in saved.items())
        assert changed == index[f"layer_{i}"][name]["bld"]["kept"]
