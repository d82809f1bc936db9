"""Blocks that replace two consecutive parent layers: the solve pass's set partition, BLD, scoring, assembly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAST_RUN, tiny_parent

from hwopt.bld import INDEX, BLDSettings, Library, build_library
from hwopt.builtin.mip_solvers import GreedySolver, HighsSolver, ScipSolver
from hwopt.cli import main
from hwopt.errors import HwoptError
from hwopt.metric import Outputs
from hwopt.model.checkpoint import load_checkpoint, save_nemotron_nas
from hwopt.plugins import block_types, metrics
from hwopt.problem import Constraint, problem_from_library
from hwopt.run import Run, load_settings
from hwopt.scoring import block_stats, outputs_of, score_metrics, swapped_final_hidden, with_costs
from hwopt.search_space import SearchSpace
from hwopt.two_layer import (
    SPANNED,
    add_two_layer_entries,
    assemble_child,
    build_two_layer,
    two_layer_name,
    two_layer_subspace,
)

RUNTIME, KL = "stats.runtime_ms", "metrics.kl_div"


# --- the MIP: every parent layer covered exactly once -------------------------------------------------

def random_two_layer_library(seed: int, n_layers: int = 5) -> dict:
    """One-layer variants v0 (the parent), v1, v2 per layer; two-layer blocks t0, t1 at every layer but the last;
    a ``spanned`` entry (with a small cost of its own) in every layer but the first."""
    rng = np.random.default_rng(seed)

    def entry(runtime, kl, **flags):
        return {"stats": {"runtime_ms": float(runtime)}, "metrics": {"kl_div": float(kl)}, **flags}

    library = {}
    for i in range(n_layers):
        layer = {"v0": entry(rng.uniform(8, 10), 0.0, parent=True)}
        layer.update({f"v{j}": entry(rng.uniform(1, 8), rng.uniform(0, 1)) for j in (1, 2)})
        if i < n_layers - 1:
            layer.update({f"t{j}": entry(rng.uniform(2, 10), rng.uniform(0, 1.5), span=2) for j in (0, 1)})
        if i > 0:
            layer[SPANNED] = entry(rng.uniform(0, 0.3), 0.0, spanned=True)
        library[f"layer_{i}"] = layer
    return library


def tilings(library: dict, layer: int = 0):
    """Every way to cover layers ``layer``.. once, by one-layer variants or two-layer blocks, as a choice per
    layer: enumerated from the layers, not from the library's flags the solver reads."""
    n = len(library)
    if layer == n:
        yield {}
        return
    name = f"layer_{layer}"
    for variant in [v for v in library[name] if v.startswith("v")]:
        for rest in tilings(library, layer + 1):
            yield {name: variant, **rest}
    if layer + 1 < n:
        for variant in [v for v in library[name] if v.startswith("t")]:
            for rest in tilings(library, layer + 2):
                yield {name: variant, f"layer_{layer + 1}": SPANNED, **rest}


def total(library: dict, choice: dict, key: str) -> float:
    section, name = key.split(".")
    return sum(library[layer][v][section][name] for layer, v in choice.items())


@pytest.mark.parametrize("solver", [ScipSolver(), HighsSolver()], ids=lambda s: s.name)
@pytest.mark.parametrize("seed", range(6))
def test_mip_covers_every_layer_once_and_matches_brute_force(seed, solver):
    library = random_two_layer_library(seed)
    parent_runtime = total(library, {layer: "v0" for layer in library}, RUNTIME)
    budget = Constraint(RUNTIME, max=parent_runtime / (1.6 + 0.3 * seed))
    problem = problem_from_library(library, KL, [budget])
    assert len(problem.links) == len(library) - 1

    feasible = [c for c in tilings(library) if total(library, c, RUNTIME) <= budget.max]
    solution = solver.solve(problem, time_limit_s=10)
    if not feasible:
        assert solution is None
        return
    best = min(feasible, key=lambda c: total(library, c, KL))
    assert solution.objective == pytest.approx(total(library, best, KL), abs=1e-9)
    assert solution.choice in list(tilings(library))  # each layer exactly once
    assert total(library, solution.choice, RUNTIME) <= budget.max + 1e-9
    assert problem.is_feasible(solution.choice)


def test_the_optimum_uses_two_layer_blocks_when_they_pay():
    library = random_two_layer_library(0, n_layers=4)
    for layer in library.values():  # make two-layer blocks cheap and good: the best child takes two of them
        for name, entry in layer.items():
            if name.startswith("t"):
                entry["stats"]["runtime_ms"], entry["metrics"]["kl_div"] = 1.0, 0.01
    problem = problem_from_library(library, KL, [Constraint(RUNTIME, max=8.0)])
    solution = ScipSolver().solve(problem, 10)
    spans = [layer for layer, v in solution.choice.items() if v.startswith("t")]
    assert len(spans) == 2 and all(solution.choice[f"layer_{int(s[6:]) + 1}"] == SPANNED for s in spans)


def test_a_spanned_layer_alone_or_two_blocks_overlapping_is_infeasible():
    problem = problem_from_library(random_two_layer_library(1, n_layers=3), KL, [])
    assert not problem.is_feasible({"layer_0": "v1", "layer_1": SPANNED, "layer_2": "v0"})
    assert not problem.is_feasible({"layer_0": "t0", "layer_1": "v1", "layer_2": "v0"})
    assert not problem.is_feasible({"layer_0": "t0", "layer_1": "t1", "layer_2": SPANNED})
    assert problem.is_feasible({"layer_0": "v2", "layer_1": "t1", "layer_2": SPANNED})


def test_greedy_answers_cover_every_layer_once():
    for seed in range(6):
        library = random_two_layer_library(seed)
        parent_runtime = total(library, {layer: "v0" for layer in library}, RUNTIME)
        problem = problem_from_library(library, KL, [Constraint(RUNTIME, max=parent_runtime / 1.5)])
        solution = GreedySolver().solve(problem)
        assert solution is None or solution.choice in list(tilings(library))


@pytest.mark.parametrize("edit, words", [
    (lambda lib: lib["layer_2"].update(t9={"stats": {}, "metrics": {}, "span": 2}), "layer_2 variant 't9' spans"),
    (lambda lib: lib["layer_1"].update(t0={**lib["layer_1"]["t0"], "span": 3}), "layer_1 variant 't0': span 3"),
    (lambda lib: [lib["layer_0"].pop(k) for k in ("t0", "t1")], "layer_1 variant 'spanned' is flagged spanned"),
    (lambda lib: lib["layer_1"].pop(SPANNED), "so layer_1 must flag exactly one"),
])
def test_malformed_spans_are_one_line_errors(edit, words):
    library = random_two_layer_library(2, n_layers=3)
    edit(library)
    with pytest.raises(HwoptError, match=words.replace("(", r"\(")):
        problem_from_library(library, KL, [])


# --- BLD, scoring and assembly on a tiny random model ------------------------------------------------

VOCAB = 96



def fake_costs(library: Library) -> dict:
    """Per-variant costs proportional to parameters (enough for the score pass's join)."""
    keys = ("runtime_ms", "prefill_ms", "decode_ms", "ttft_ms", "memory_mib", "weights_mib", "kv_cache_mib",
            "num_params")
    costs = {"source": {"summary": "test"}, "attention": {}, "ffn": {}}
    for kind in ("attention", "ffn"):
        for name in library.variant_names(0, kind):
            v = library.sub_variant(0, kind, name)
            n = v.block_type.num_params(v.config, library.config)
            costs[kind][name] = {key: float(n) for key in keys}
    return costs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny parent, its one-layer library and its two-layer blocks, trained on random tokens."""
    root = tmp_path_factory.mktemp("two_layer")
    parent = tiny_parent(512, VOCAB)
    torch.manual_seed(1)
    train_ids = torch.randint(0, VOCAB, (40, 16))
    settings = BLDSettings(tokens=640, batch_sequences=4, lr=3e-3)
    space = SearchSpace(kv_heads=(1,), ffn_fractions=(0.5,))
    build_library(parent, train_ids, space, settings, root / "library")
    library = Library(root / "library", parent)
    build_two_layer(parent, library, train_ids, settings, root / "library/two_layer")
    return parent, library, Library(root / "library", parent, root / "library/two_layer"), root


def test_bld_of_two_layer_blocks_reduces_the_loss_of_reproducing_both_layers(built):
    parent, library, two_layer, _ = built
    subspace = two_layer_subspace(library, 4)
    assert subspace == {i: [("kv2", "ffn512"), ("kv1", "ffn256")] for i in range(3)}
    index = two_layer.coupled
    assert {layer: sorted(pairs) for layer, pairs in index.items()} == {
        f"layer_{i}": ["kv1+ffn256", "kv2+ffn512"] for i in range(3)}
    for pairs in index.values():
        for entry in pairs.values():
            assert entry["bld"]["final_nmse"] < entry["bld"]["init_nmse"]
    # the loss is against both layers: the parent's own layer alone starts where it misses layer i + 1's part
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        pe = parent.position_embeddings(x, 0)
        after_one = parent.model.layers[1](x, pe)
        after_two = parent.model.layers[2](after_one, pe)
        trained = two_layer.layer(1, "kv2", "ffn512")(x, pe)
    assert (trained - after_two).pow(2).sum() < (after_one - after_two).pow(2).sum()


def test_replace_2_blocks_scores_and_the_assembled_child_round_trips(built, tmp_path):
    parent, library, two_layer, root = built
    heldout = torch.randint(0, VOCAB, (3, 16))
    kl = metrics().get("kl_div")
    costs = fake_costs(library)
    one_layer = score_metrics(parent, library, heldout, [kl], tmp_path / "score")
    block_library = with_costs(add_two_layer_entries(parent, two_layer, one_layer, heldout, [kl]), costs)

    assert set(block_library["layer_0"]) - set(one_layer["layer_0"]) == {"2L:kv2+ffn512", "2L:kv1+ffn256"}
    assert SPANNED not in block_library["layer_0"] and "2L:kv2+ffn512" not in block_library["layer_3"]
    for i in (1, 2, 3):
        spanned = block_library[f"layer_{i}"][SPANNED]
        assert spanned["spanned"] and spanned["metrics"] == {"kl_div": 0.0}
        assert spanned["stats"] == block_stats(costs, "attn_noop", "ffn_noop")
        assert spanned["block_config"]["attention"]["no_op"] and spanned["block_config"]["ffn"]["no_op"]
    entry = block_library["layer_1"][two_layer_name("kv1", "ffn256")]
    assert entry["span"] == 2 and entry["stats"] == block_stats(costs, "kv1", "ffn256")

    # the block at layer 1 with layer 2 a no-op: the child scored is the child assembled
    choice = [("kv2", "ffn512"), ("kv1", "ffn256"), ("attn_noop", "ffn_noop"), ("kv2", "ffn512")]
    child = assemble_child(library, two_layer, choice, spans=[1])
    assert child.model.layers[2].self_attn is None and child.model.layers[2].mlp is None
    saved = two_layer.layer(1, "kv1", "ffn256").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in child.model.layers[1].state_dict().items())
    with torch.no_grad():
        teacher = outputs_of(swapped_final_hidden(parent, heldout), parent.output_head(), heldout, None, None)
        logits = child(heldout).logits
        student = Outputs(logits=logits.flatten(0, 1), hidden=None, labels=None)
    assert kl.compute(student, teacher) == pytest.approx(entry["metrics"]["kl_div"], rel=1e-4, abs=1e-7)
    # one layer's variants alone would give another model
    assert not torch.equal(library.assemble(choice)(heldout).logits, logits)

    save_nemotron_nas(child, tmp_path / "child")
    config = json.loads((tmp_path / "child/config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert config["block_configs"][2]["attention"]["no_op"] and config["block_configs"][2]["ffn"]["no_op"]
    reloaded = load_checkpoint(tmp_path / "child", block_types())
    with torch.no_grad():
        assert torch.equal(reloaded(heldout).logits, logits)


def test_assembly_refuses_a_span_whose_next_layer_is_not_a_no_op(built):
    _, library, two_layer, _ = built
    with pytest.raises(HwoptError, match="layer 1 holds a two-layer block, so layer 2 must be a no-op"):
        assemble_child(library, two_layer, [("kv2", "ffn512")] * 4, spans=[1])
    with pytest.raises(HwoptError, match="no two-layer block kv1\\+ffn512 was trained at layer 0"):
        assemble_child(library, two_layer, [("kv1", "ffn512"), ("attn_noop", "ffn_noop")] + [("kv2", "ffn512")] * 2,
                       spans=[0])


# --- through the command line ------------------------------------------------------------------------

def test_pipeline_with_two_layer_blocks_through_solve(tiny_llama_dir, tmp_path):
    workdir = tmp_path / "run"
    assert main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(workdir), "--until", "uptrain",
                 "--speedup", "1.1", "--speedup-checks", "0", *FAST_RUN, "--two-layer",
                 "--backend", "roofline"]) == 0  # estimated costs: the budget must not depend on the load
    assert json.loads((workdir / "run.json").read_text())["two_layer"] is True
    index = json.loads((workdir / "library/two_layer" / INDEX).read_text())
    assert set(index) == {"layer_0", "layer_1", "layer_2"}
    library = json.loads((workdir / "score/block_library.json").read_text())
    for i in range(3):
        spanning = [e for e in library[f"layer_{i}"].values() if e.get("span") == 2]
        assert len(spanning) == 2 and all(e["scored"] == "replace-2-blocks" for e in spanning)
        assert library[f"layer_{i + 1}"][SPANNED]["spanned"]
    # the parent's own block over two layers: it costs one parent layer and replaces two
    solutions = json.loads((workdir / "solve/solutions.json").read_text())
    best = solutions["solutions"][0]
    for i in best["spans"]:
        assert best["variants"][i + 1] == ["attn_noop", "ffn_noop"]
        assert best["choice"][f"layer_{i + 1}"] == SPANNED
    problem = problem_from_library(library, KL, [])
    assert problem.is_feasible(best["choice"])
    config = json.loads((workdir / "uptrain/model/config.json").read_text())
    for i in best["spans"]:
        assert config["block_configs"][i + 1]["attention"]["no_op"] and config["block_configs"][i + 1]["ffn"]["no_op"]

    # the run's child with a two-layer block at layer 1 is the model its replace-2-blocks score measured
    run = Run(workdir, load_settings(workdir, {}))
    name, entry = min(((n, e) for n, e in library["layer_1"].items() if e.get("span") == 2),
                      key=lambda item: item[1]["metrics"]["kl_div"])
    parent_pairs = [next([e["attention"], e["ffn"]] for e in layer.values() if e["parent"]) for layer in
                    library.values()]
    variants = [parent_pairs[0], [entry["attention"], entry["ffn"]], ["attn_noop", "ffn_noop"], parent_pairs[3]]
    child = run.assemble({"variants": variants, "spans": [1]})
    ids = run.split.score_batches(run.settings.score_tokens)
    with torch.no_grad():
        kl = metrics().get("kl_div").compute(Outputs(logits=child(ids).logits.flatten(0, 1), hidden=None, labels=None),
                                             Outputs(logits=run.parent(ids).logits.flatten(0, 1), hidden=None,
                                                     labels=None))
    assert kl == pytest.approx(entry["metrics"]["kl_div"], rel=1e-4, abs=1e-7), name


def test_two_layer_without_no_ops_is_one_error_line(tiny_llama_dir, tmp_path, capsys):
    code = main(["optimize", "--model", str(tiny_llama_dir), "--workdir", str(tmp_path / "run"), "--until",
                 "library", *FAST_RUN, "--two-layer", "--no-noop"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hwopt: error:")]
    assert code != 0 and errors == ["hwopt: error: --two-layer leaves a no-op layer after each two-layer block: "
                                    "drop --no-noop"]
