"""The ``hwopt`` command line.

``hwopt optimize`` runs every pass; ``hwopt <pass>`` runs one. All of them
work on a run directory (``--workdir``) and share its settings. Errors in
the user's input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from hwopt import __version__
from hwopt.errors import HwoptError
from hwopt.lowering.runtimes import RUNTIMES
from hwopt.passes import PASS_INFO, settings_read_by
from hwopt.pipeline import PASSES, UNSET, under_torchrun
from hwopt.settings import DEFAULT_SCENARIO, EVALUATION_TOKENS, Settings, load_settings, run_containing

SETTINGS_DEFAULTS = {f.name: getattr(Settings(), f.name) for f in dataclasses.fields(Settings)}


def _csv(cast):
    def parse(text: str):
        try:
            return [cast(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def or_none(cast):
    """An option's type that also takes ``none``, which unsets the value the run remembers."""
    def parse(text: str):
        return UNSET if text.lower() == UNSET else cast(text)
    parse.__name__ = cast.__name__  # argparse names the type in its error message
    return parse


def finite(text: str) -> float:
    """A float option's type: ``nan`` and ``inf``, which ``float`` takes, are refused (argparse then says
    "invalid finite value")."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def memory_size(text: str) -> str:
    """``--max-memory``'s type: a positive size such as 8GiB or 512MiB, kept as given; anything else is argparse's
    one usage error line, with ``parse_max_memory``'s reason. Checked before anything heavy is imported."""
    from hwopt.solving import parse_max_memory

    try:
        parse_max_memory(text)
    except HwoptError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def number(text: str) -> int | float:
    value = finite(text)
    return int(value) if value.is_integer() else value


def block_type_options() -> dict[str, str]:
    """The search-space options of every installed block type (``--window``), name -> help."""
    from hwopt.plugins import block_types

    return block_types().options()


AUTO_BACKEND = "torch where it can measure on the target here, else the roofline estimate"


class Options:
    """Adds a command's options to its parser, each with its help and its default from ``Settings``.

    ``shown``: the settings the command reads (``settings_read_by``); an option
    for any other setting is still accepted, and remembered for the run's
    later commands, but left out of the help. None shows every option.
    """

    def __init__(self, parser: argparse.ArgumentParser, shown: set[str] | None = None):
        self.parser, self.shown = parser, shown
        self.group = parser

    def section(self, title: str, description: str | None = None) -> Options:
        self.group = self.parser.add_argument_group(title, description)
        return self

    def add(self, flag: str, help: str, setting: str | None = None, **kwargs) -> None:
        """Add ``flag``; ``setting``: the ``Settings`` field it sets (default: its dest), if any."""
        setting = setting or kwargs.get("dest") or flag.removeprefix("--").replace("-", "_")
        if setting in SETTINGS_DEFAULTS:
            if self.shown is not None and setting not in self.shown:
                help = argparse.SUPPRESS
            elif (SETTINGS_DEFAULTS[setting] not in (None, [], {}) and "default" not in help
                  and kwargs.get("action") != "store_const"):  # a --no-X switch: its setting's default would mislead
                value = SETTINGS_DEFAULTS[setting]
                help += f" (default {','.join(map(str, value)) if isinstance(value, list) else value})"
        self.group.add_argument(flag, help=help, **kwargs)


def add_scenario_options(o: Options, backend_default: str = AUTO_BACKEND) -> None:
    """The serving scenario and how its costs are found (shared by the passes and ``estimate``)."""
    o.section("scenario")
    o.add("--scenario", "INPUT/OUTPUT tokens per request")
    o.add("--batch", "requests served together", type=int)
    o.add("--dtype", "weights and activations: fp32, bf16, fp16, fp8 (default: bf16 on a GPU, fp32 on the CPU)")
    o.add("--kv-dtype", "KV cache dtype (default: the --dtype)")
    o.add("--backend", "measurement backend: torch, onnxruntime, tensorrt, roofline, or auto (default: "
                       f"{backend_default})")
    o.add("--require-measured", "stop with an error rather than estimate when nothing can measure on the target here",
          action="store_const", const=True)
    o.add("--repeats", "timed rounds of every block, interleaved (default 5; more while a block's median is not "
                       "known to within 4%%, for a bounded time)", type=int)


def add_run_options(p: argparse.ArgumentParser, command: str, plugin_options: bool = True) -> None:
    """The options of ``hwopt <command>`` (a pass, or ``optimize``); unset ones come from the run's run.json, then
    the defaults in ``hwopt.settings``.

    ``plugin_options``: also the installed block types' options, which loads every plugin (and torch).
    """
    o = Options(p, None if command == "optimize" else settings_read_by(command))
    if command != "optimize":
        p.epilog = ("Options of the other passes are accepted too, and remembered for the run's later commands: "
                    "`hwopt optimize --help` lists them all.")
    o.section("run")
    o.add("--workdir", "run directory (default: runs/default)", default="runs/default")
    o.add("--force", "run the pass(es) even if their inputs did not change", action="store_true")
    o.add("--max-spread", "stop with an error when a measured block's timings spread (IQR / median over rounds) by "
                          "more than this, e.g. 0.1, or the machine is too busy to measure (default: warn when a "
                          "median's standard error exceeds 4%%)",
          type=or_none(finite))
    o.add("--threads", "torch CPU threads for this run, per process under torchrun (default: chosen by its first "
                       "command, one per core other processes leave idle, shared among a node's ranks, then kept)",
          type=or_none(int))
    o.add("--device", "where library, score, uptrain and the report run: auto (the target's GPU when it is here, else "
                      "the CPU), cpu, cuda, cuda:N (under torchrun, cuda is each rank's LOCAL_RANK)")
    o.add("--train-dtype", "the parent and activations there; trained weights and AdamW state stay fp32 (default: "
                           "bf16 on a GPU or on a CPU with native bf16 (AMX, AVX512-BF16), else fp32; whole models "
                           "are timed and compared in the scenario's --dtype)", choices=("bf16", "fp32"))
    o.add("--max-memory", "host memory per rank a pass may plan for, e.g. 8GiB (a bare number is MiB): a pass whose "
                          "memory plan needs more stops before it starts (default: no limit; score carries up to 1 GiB "
                          "of hidden states)",
          type=or_none(memory_size))
    o.add("--model", "model name (smollm2-135m, llama-3.1-8b, llama-3.1-70b) or checkpoint directory")
    o.add("--target", "hardware target: cpu, h100, h200, a100, 4090, auto (the GPU NVML sees, else the CPU), or a "
                      "target .toml")
    add_scenario_options(o)
    o.section("search space")
    o.add("--kv-heads", "KV-head counts to offer (default: every divisor)", type=or_none(_csv(int)))
    o.add("--ffn-fractions", "FFN widths to offer", type=_csv(finite))
    o.add("--no-linear", "offer no linear blocks", dest="linear", action="store_const", const=False)
    o.add("--no-noop", "offer no removed blocks", dest="no_op", action="store_const", const=False)
    o.add("--two-layer", "also offer blocks that replace two consecutive parent layers (the layer after one is a "
                         "no-op): the parent's own block and the largest cheaper one, trained by BLD on both layers "
                         "(default: off)", dest="two_layer", action="store_const", const=True)
    o.add("--no-two-layer", "offer one-layer blocks only (the default)", dest="two_layer", action="store_const",
          const=False)
    o.add("--block-types", "also offer the variants of these plugins' block types (default: built-ins only; "
                           "`hwopt plugins` lists them)", type=_csv(str), metavar="PLUGIN[,PLUGIN]")
    for option, text in block_type_options().items() if plugin_options else ():
        o.add(f"--{option}", f"{text} (a block type's option)", setting="block_options", type=_csv(number))
    o.section("data and training")
    o.add("--data", "text or JSONL files (default: Python's own documentation); text sampled from the parent is "
                    "mixed in (--distill-samples)", nargs="+")
    o.add("--distill-samples", "tokens sampled from the parent and mixed 1:1 into training (data-free "
                               "distillation; 0 for none)", type=int)
    o.add("--distill-temperature", "temperature of that sampling: below 1 the parent's text is more coherent "
                                   "(more like what people write), above 1 more varied", type=finite)
    o.add("--seq-len", "tokens per training sequence", type=int)
    o.add("--bld-tokens", "blockwise distillation (BLD) tokens per variant", type=int)
    o.add("--bld-lr", "blockwise distillation (BLD) learning rate", type=finite)
    o.add("--score-tokens", "held-out tokens for replace-1-block scoring", type=int)
    o.add("--score-pairs", "decoupled: run each attention and each FFN variant beside the parent's other half and "
                           "estimate pairs to first order; coupled: run every (attention, FFN) pair",
          choices=("decoupled", "coupled"))
    o.add("--metric", "replace-1-block metric (repeatable): kl_div, lm_loss, cosine, top1_agreement, "
                      "top5_agreement, task_accuracy, or a plugin's", dest="metrics", action="append")
    o.add("--task-data", "multiple-choice JSONL for --metric task_accuracy, one "
                         '{"question": ..., "choices": [...], "answer": index or choice text} per line')
    o.add("--uptrain-tokens", "global distillation (GKD) tokens", type=int)
    o.add("--uptrain-lr", "global distillation (GKD) learning rate", type=finite)
    o.add("--uptrain-sharding", "under torchrun: ddp (every rank holds the whole child), fsdp (each rank a shard of "
                                "the child and the teacher), or auto (fsdp when the ddp memory plan does not fit "
                                "one rank)", choices=("auto", "ddp", "fsdp"))
    o.add("--seed", "random seed of training and data order", type=int)
    o.section("search", "budgets the run remembers; `none` forgets one (--memory none)")
    o.add("--objective", "library key to optimise (default: metrics.<first metric>)")
    o.add("--speedup", "child runtime at most parent runtime / X", type=or_none(finite))
    o.add("--memory", "weights + KV cache at most this (e.g. 80GB, 300MiB; a bare number is MiB)")
    o.add("--throughput", "at least this many tokens/s (input + output tokens)", type=or_none(finite))
    o.add("--latency", "the whole batch's generation in at most this many ms (stats.runtime_ms)", type=or_none(finite))
    o.add("--ttft", "time to first token (TTFT) at most this many ms (stats.ttft_ms, or stats.prefill_ms in "
                    "libraries without it)", type=or_none(finite))
    o.add("--params", "at most this many parameters, e.g. 50B, 135M (stats.num_params)")
    o.add("--solver", "solver: scip, highs, greedy, or a plugin's")
    o.add("--num-solutions", "this many solutions, best first", type=int)
    o.add("--min-diversity", "each solution differs from every earlier one in at least this many layers", type=int)
    o.add("--time-limit", "solver seconds per solution", type=finite)
    o.add("--speedup-checks", "with --speedup on this CPU: time the chosen child against the parent and solve again "
                              "with a budget tighter by the shortfall while it measures slower; at most this many "
                              "children (0: off)",
          type=int)
    o.add("--select-tokens", "GKD tokens each candidate child gets (the MIP's solutions and the layer-dropping child "
                             "as fast) before solve keeps the one closest to the parent on validation English "
                             "(0: the MIP's first, unselected)", type=int)
    o.add("--coupled-bld", "coupled BLD (Puzzle Table 6): train the (attention, FFN) pairs of this many diverse "
                           "decoupled solutions as whole layers, score them again and solve again (0: off)", type=int)
    o.section("lower")
    o.add("--format", "output formats, comma-separated or repeated (`hwopt lower --help` lists them)",
          dest="formats", action="extend", type=_csv(str))
    o.add("--runtime", f"the runtime that will serve the child: {', '.join(RUNTIMES)} (default: tensorrt-llm on a "
                       "GPU target, transformers on the CPU); the search leaves out what it cannot run and lower "
                       "refuses what it would misread")


# options of `hwopt solve --library`, which works on a library file instead of a run directory
LIBRARY_OPTIONS = ("library", "max", "range", "maximize", "sweep", "json")


def add_library_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("any block library (no run directory)")
    g.add_argument("--library", help="solve this block_library.json (ours or a published one) instead of the run's")
    g.add_argument("--max", action="append", metavar="KEY=VALUE",
                   help="total of a library key at most VALUE, e.g. stats.memory_mib=80000 (repeatable)")
    g.add_argument("--range", action="append", metavar="KEY=LOW:HIGH",
                   help="total of a library key within LOW..HIGH; either side may be empty (repeatable)")
    g.add_argument("--maximize", action="store_true", default=None, help="maximise the objective")
    g.add_argument("--sweep", metavar="KEY=START:STOP:POINTS",
                   help="Pareto sweep: budgets on KEY at POINTS fractions from START to STOP of the parent's total "
                        "(or, without parent flags, of the largest variant per layer), e.g. stats.runtime_ms=0.4:1:13")
    g.add_argument("--json", help="write the solutions here (a sweep also writes <name>.sweep.csv and .png)")


def add_standalone_lower_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="lower --model (any Llama or nemotron-nas checkpoint directory) into OUT/<format>, "
                                 "outside any run directory")
    p.format_help = lambda: Parser.format_help(p) + formats_help()  # the formats plugins register


def formats_help() -> str:
    from hwopt.plugins import formats

    lines = ["", "formats:"]
    for fmt in formats():
        lines += [f"  {fmt.name}: {fmt.description}", f"    needs: {fmt.needs}"]
    return "\n".join(lines) + "\n"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, what went wrong and where the help is (argparse's own print
    the usage block first); it exits with status 2. Its sub-commands' parsers are ``Parser`` too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        """argparse's help without the sections whose every option this command hides (another pass's settings,
        accepted but not listed), which argparse would still head with their title and description."""
        groups = self._action_groups
        self._action_groups = [g for g in groups if not g._group_actions
                               or any(a.help is not argparse.SUPPRESS for a in g._group_actions)]
        try:
            return super().format_help()
        finally:
            self._action_groups = groups

    def parse_args(self, args=None, namespace=None):
        """``ArgumentParser.parse_args``, with arguments no option takes blamed on the sub-command they were given
        to (argparse blames ``hwopt``), so that its help is the one named."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            commands.get(getattr(parsed, "command", None), self).error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the sub-command ``command``, if it reads the search space, offers the options plugins'
    block types add (finding them loads every plugin)."""
    parser = Parser(prog="hwopt", description="Hardware-aware LLM optimisation (Puzzle).")
    parser.add_argument("--version", action="version", version=f"hwopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimize", help="run every pass: " + " -> ".join(PASSES))
    add_run_options(p, "optimize", command == "optimize")
    p.add_argument("--from", dest="start", choices=PASSES, default="profile",
                   help="first pass to run; earlier ones must have run (default profile)")
    p.add_argument("--until", choices=PASSES, default="lower", help="last pass to run (default lower)")
    for name in PASSES:
        add_run_options(p := sub.add_parser(name, help=f"run the {name} pass alone"), name,
                        command == name and "block_options" in settings_read_by(name))
        if name == "solve":
            add_library_options(p)
        if name == "lower":
            add_standalone_lower_options(p)
    p = sub.add_parser("estimate", help="runtime, memory and tokens/s of an architecture on a target "
                                        "(no weights needed)")
    p.add_argument("--model", required=True,
                   help="model name, Llama or nemotron-nas checkpoint directory, or its config.json")
    p.add_argument("--target", default="auto", help="hardware target (default auto)")
    p.add_argument("--parent", help="a model to compare with, layer by layer (e.g. the child's parent)")
    p.add_argument("--plot", help="write the per-layer runtime picture (PNG) here")
    p.add_argument("--json", action="store_true", help="print the result as JSON (for machines)")
    add_scenario_options(Options(p), backend_default="roofline")
    p = sub.add_parser("evaluate", help="a child against its parent: held-out KL, perplexity, top-1 agreement, task "
                                        "accuracy; runtime, tokens/s and memory measured here; report.md with pictures")
    p.add_argument("--model", required=True, help="the child: a nemotron-nas (or Llama) checkpoint directory; one "
                                                  "inside a run directory (runs/demo/uptrain/model) takes that run's "
                                                  "parent, data, sequence length, target and scenario unless given")
    p.add_argument("--parent", help="its parent: a model name or checkpoint directory (default: the run's model)")
    p.add_argument("--data", nargs="+", help="text or JSONL files whose last tenth is the held-out text (default: "
                                            "the run's, else Python's own documentation, as the runs use)")
    p.add_argument("--task-data", help="multiple-choice JSONL to measure task accuracy on")
    p.add_argument("--tokens", type=int, default=EVALUATION_TOKENS,
                   help=f"held-out tokens from --data (default {EVALUATION_TOKENS}, as a run's closing report)")
    p.add_argument("--seq-len", type=int, help="tokens per held-out sequence (default: the run's, else 128)")
    p.add_argument("--target", help="target the per-layer runtimes are predicted for (default: the run's, else cpu)")
    p.add_argument("--device", default="auto", help="where both models run: auto (the target's GPU when it is here, "
                                                    "else the CPU), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--out", default="evaluation", help="folder for report.md, evaluation.json and per_layer.png "
                                                       "(default ./evaluation)")
    p.add_argument("--threads", type=or_none(int), help="torch CPU threads (default: the run's; else, or none: one "
                                                        "per core other processes leave idle)")
    p.add_argument("--max-memory", type=memory_size,
                   help="host memory both models may take whole, e.g. 8GiB, a bare number MiB (default: the run's, "
                                        "else no limit): where they do not fit it (or the GPU), quality is computed "
                                        "a layer at a time and the runtime is not measured")
    add_scenario_options(Options(p), backend_default="the run's, else roofline")
    p = sub.add_parser("calibrate", help="time every block variant with a measuring backend; write the target's "
                                         ".toml with these timings, which fit the roofline estimate")
    p.add_argument("--target", required=True, help="hardware target to measure on: cpu, h100, ..., or a target .toml")
    p.add_argument("--model", required=True, help="model name whose search space is timed (e.g. smollm2-135m)")
    p.add_argument("--scenario", action="append", help="INPUT/OUTPUT tokens per request (repeatable; "
                                                          f"default {DEFAULT_SCENARIO})")
    p.add_argument("--batch", type=int, default=1, help="requests served together (default 1)")
    p.add_argument("--dtype", help="weights, activations and KV cache (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--backend", default="torch", help="measuring backend (default torch)")
    p.add_argument("--device", default="auto", help="where the blocks are timed, of the target's kind: auto (the "
                                                    "target's GPU when it is here, else the CPU), cpu, cuda, cuda:N "
                                                    "(default auto)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    p.add_argument("--out", required=True, help="the calibrated target .toml to write")
    sub.add_parser("plugins", help="list plugins and what each registered")
    sub.add_parser("targets", help="list hardware targets")
    return parser


def cmd_plugins() -> None:
    from hwopt.plugins import listing

    for plugin, kinds in sorted(listing().items()):
        print(plugin)
        for kind, names in sorted(kinds.items()):
            print(f"  {kind}: {', '.join(names)}")


def cmd_targets() -> None:
    from hwopt.plugins import targets

    for p in targets():
        p = p.with_system_facts()
        aliases = f"; aliases: {', '.join(p.aliases)}" if p.aliases else ""
        memory = f"{p.memory_gib:g} GiB, " if p.memory_gib else ""
        bandwidth = f"{p.bandwidth_gbs:g} GB/s, " if p.bandwidth_gbs else ""
        print(f"{p.name:<12} {p.kind}  {p.description} ({memory}{bandwidth}{'/'.join(p.dtypes)}{aliases})")


def standalone_scenario(args: argparse.Namespace, target):
    """The scenario of a command that works outside a run (estimate, evaluate, lower --model): its options, else the
    run's defaults. ``--batch 0`` is refused by ``Scenario``, not read as unset."""
    from hwopt.search_space import Scenario

    batch = SETTINGS_DEFAULTS["batch"] if args.batch is None else args.batch
    return Scenario.for_target(target, args.scenario or DEFAULT_SCENARIO, batch, args.dtype,
                               getattr(args, "kv_dtype", None))


def cmd_estimate(args: argparse.Namespace) -> None:
    """Cost the model (and the --parent) on the target; print a table, or JSON with --json."""
    from hwopt.estimate import estimate, print_estimate
    from hwopt.model_source import resolve_model
    from hwopt.plots import per_layer_runtime
    from hwopt.targets import resolve_target

    target = resolve_target(args.target)
    scenario = standalone_scenario(args, target)
    models = {"model": args.model, **({"parent": args.parent} if args.parent else {})}
    sources = {role: resolve_model(name) for role, name in models.items()}
    results = {role: estimate(source, target, scenario, args.backend or "roofline", args.repeats or 5,
                                        args.require_measured)
               for role, source in sources.items()}
    if args.plot:
        parent = results.get("parent")
        source = results["model"]["source"]
        against = f" against {args.parent}" if parent else ""
        per_layer_runtime(args.plot, results["model"]["layers"], parent["layers"] if parent else None,
                          f"{args.model}{against} on {target.name}, {scenario.describe()}: {source['kind']} "
                          f"by the {source['backend_name']} backend",
                          child_label="model" if not parent else "child")
    if args.json:
        print(json.dumps(results["model"] if not args.parent else results, indent=2))
        return
    for result in results.values():
        print_estimate(result)
    if args.parent:
        child, parent = results["model"]["total"], results["parent"]["total"]
        print(f"{args.model} / {args.parent}: {parent['runtime_ms'] / child['runtime_ms']:.2f}x the throughput, "
              f"{child['memory_mib'] / parent['memory_mib']:.2f}x the memory, KV cache "
              f"{parent['kv_cache_mib'] - child['kv_cache_mib']:,.0f} MiB smaller")


# evaluate's options taken from a run's run.json when not given: option -> setting
EVALUATE_FROM_RUN = {"parent": "model", **{k: k for k in ("data", "seq_len", "target", "scenario", "batch", "dtype",
                                                          "kv_dtype", "threads", "backend", "max_memory")}}


def take_run_settings(args: argparse.Namespace) -> None:
    """``hwopt evaluate`` of a run's child: the options not given (``EVALUATE_FROM_RUN``) from the run's run.json,
    so the child is measured on the text and in the scenario it was made for; else the runs' defaults. Raises
    ``HwoptError`` when no parent is known."""
    from hwopt.model_source import resolve_model

    found = run_containing(args.model)
    if found:
        workdir, saved = found
        taken = {key: saved[setting] for key, setting in EVALUATE_FROM_RUN.items()
                 if getattr(args, key) is None and saved.get(setting) is not None}
        for key, value in taken.items():
            setattr(args, key, value)
        if taken:
            values = ", ".join(f"{k.replace('_', ' ')} {getattr(args, k)}" for k in taken)
            print(f"{args.model} is in run {workdir}; from its run.json: {values}", file=sys.stderr)
    if args.parent is None:
        resolve_model(args.model)  # one that is neither a path nor a known name says so first
        raise HwoptError(f"{args.model} is not inside a run directory: say which model is its parent (--parent)")
    args.seq_len = SETTINGS_DEFAULTS["seq_len"] if args.seq_len is None else args.seq_len
    args.target = args.target or SETTINGS_DEFAULTS["target"]


def run_profile(args: argparse.Namespace) -> tuple[Path, dict] | None:
    """The profile (``costs.json``) of the run ``args.model`` lies in, and its path, when evaluate times blocks as
    that run did: the same parent, measurement backend and CPU threads (``hwopt.estimate.from_profile`` checks the
    target, the scenario and that it covers every block); None otherwise."""
    found = run_containing(args.model)
    if not found:
        return None
    workdir, saved = found
    costs = workdir / "profile" / PASS_INFO["profile"].outputs["costs"]
    same = all(getattr(args, key) == saved.get(setting)
               for key, setting in (("parent", "model"), ("backend", "backend"), ("threads", "threads")))
    return (costs, json.loads(costs.read_text())) if same and costs.is_file() else None


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Quality on the held-out text sets and the task, speed and memory measured here, predicted per layer."""
    from hwopt.model_source import resolve_model
    from hwopt.targets import resolve_target

    take_run_settings(args)  # checked before torch is imported, so that bad input fails at once
    if args.tokens < args.seq_len or args.seq_len < 2:
        raise HwoptError(f"--tokens {args.tokens} must hold at least one sequence of --seq-len {args.seq_len} (>= 2)")
    target = resolve_target(args.target)
    scenario = standalone_scenario(args, target)
    import torch

    from hwopt.data import GENERAL_HELDOUT, check_data_files, general_heldout, load_split
    from hwopt.devices import deployed_placement, device_memory, resolve_placement
    from hwopt.estimate import estimate
    from hwopt.evaluate import evaluate
    from hwopt.model.layerwise import LayerwiseParent
    from hwopt.pipeline import atomic_write_json
    from hwopt.plots import per_layer_runtime
    from hwopt.plugins import block_types
    from hwopt.progress import console
    from hwopt.report import label_measurement, plan_text, print_report, whole_plan, write_markdown
    from hwopt.tasks import read_task
    from hwopt.timing import check_threads, idle_cores

    check_data_files(args.data)
    if args.threads == UNSET:
        args.threads = None
    if args.threads is not None:
        check_threads(args.threads)
    sources = {"child": resolve_model(args.model), "parent": resolve_model(args.parent)}
    if sources["child"].architecture.vocab_size != sources["parent"].architecture.vocab_size:
        raise HwoptError(f"{args.model} and {args.parent} have different vocabularies: not a child and its parent")
    tokenizer = sources["parent"].tokenizer()
    task = read_task(args.task_data, tokenizer) if args.task_data else None
    split = load_split(args.data, tokenizer, args.seq_len)
    texts = {"heldout": split.heldout_batches(args.tokens), "general": general_heldout(tokenizer, args.seq_len)}
    placement = deployed_placement(resolve_placement(args.device, None, target.kind), scenario.dtype)  # as served
    if args.threads is None:  # as a run chooses
        args.threads, load = idle_cores()
        print(f"threads: {args.threads} ({load.describe()}); --threads N changes it", file=sys.stderr)
    torch.set_num_threads(args.threads)
    streamed = [LayerwiseParent(sources[role].require_weights(), block_types(), placement.device, placement.dtype)
                for role in ("child", "parent")]  # nothing read yet
    plan, not_measured = whole_plan(*streamed, scenario, args.seq_len, placement, args.max_memory,
                                    device_memory(placement.device))
    console.print(plan_text(plan, not_measured), highlight=False, soft_wrap=True)
    child, parent = streamed if not_measured else (sources[role].load(placement.device, placement.dtype)
                                                   for role in ("child", "parent"))
    report = evaluate(child, parent, texts, scenario, task, args.repeats or 3, not_measured)
    label_measurement(report, placement, target)
    report["texts"]["heldout"]["source"] = f"the last tenth of {split.source}, in sequences of {args.seq_len}"
    report["texts"]["general"]["source"] = f"{GENERAL_HELDOUT.name}, in sequences of {args.seq_len}"
    path, profiled = run_profile(args) or (None, None)
    predicted = {role: estimate(source, target, scenario, args.backend or "roofline", args.repeats or 3,
                                profiled=profiled) for role, source in sources.items()}
    if all(p["from_profile"] for p in predicted.values()):
        print(f"predicted runtimes: the run's profile ({path}), not timed again", file=sys.stderr)
    report["predicted_speedup"] = predicted["parent"]["total"]["runtime_ms"] / predicted["child"]["total"]["runtime_ms"]
    source = predicted["child"]["source"]
    report["predicted_on"] = f"{target.name} ({source['kind']})"  # what a table row and the speedup line say
    report["predicted_by"] = source["summary"]  # the whole story, for evaluation.json
    for role in ("parent", "child"):
        report[role]["runtime_ms_predicted"] = predicted[role]["total"]["runtime_ms"]
    out = Path(args.out)
    kind = predicted["child"]["source"]["kind"]
    measured = f"{report['measured_speedup']:.2f}x here" if "measured_speedup" in report else "not here"
    per_layer_runtime(out / "per_layer.png", predicted["child"]["layers"], predicted["parent"]["layers"],
                      f"{args.model} vs parent {args.parent}: {kind} on {target.name}, {scenario.describe()}\n"
                      f"speedup predicted {report['predicted_speedup']:.2f}x ({kind}), measured {measured}",
                      label_layers=True)
    atomic_write_json(out / "evaluation.json", report)
    write_markdown(report, out / "report.md", "per_layer.png", f"{args.model} against its parent {args.parent}")
    print_report(report)
    print(f"wrote {out / 'report.md'}, {out / 'evaluation.json'}, {out / 'per_layer.png'}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Measure, write --out, print the fit; ``--target OUT --backend roofline`` then uses it."""
    from hwopt.calibration import calibrate
    from hwopt.search_space import Scenario
    from hwopt.targets import resolve_target

    target = resolve_target(args.target)
    scenarios = [Scenario.for_target(target, s, args.batch, args.dtype) for s in args.scenario or [DEFAULT_SCENARIO]]
    print(calibrate(target, args.model, scenarios, args.backend, args.repeats, Path(args.out), args.device).report())
    print(f"wrote {args.out}; use it with --target {args.out} --backend roofline")


def run_outside_costs(library: Path) -> tuple[str, dict[str, float]] | None:
    """For a block library inside a run directory (``RUN/score/block_library.json``): the run's costs outside the
    layers, from its profile, and that file's path, so `solve --library` budgets the whole model as the run's solve
    pass does; None for a library of no run (a published one)."""
    from hwopt.solving import outside_offsets

    found = run_containing(library)
    costs = found and found[0] / "profile" / PASS_INFO["profile"].outputs["costs"]
    if not costs or not costs.is_file():
        return None
    return str(costs), outside_offsets(json.loads(costs.read_text()))


def cmd_solve_library(args: argparse.Namespace) -> None:
    """`hwopt solve --library FILE`: the solve pass on any block library, no other pass needed."""
    from hwopt.search_space import Scenario
    from hwopt.solving import maximizes, parse_max, parse_range, solve_library
    from hwopt.sweep import SweepSpec

    names = {f.name for f in dataclasses.fields(Settings)}
    # no run remembers a setting here, so `none` (forget it) is the same as not giving it
    s = Settings(**{k: v for k, v in vars(args).items() if k in names and v not in (None, UNSET)})
    # a library's runtimes hold for the workload it was measured at: no default for it
    scenario = Scenario.parse(args.scenario, s.batch, s.dtype or "fp32") if args.scenario else None
    solve_library(
        Path(args.library),
        objective=s.objective_key,
        maximize=bool(args.maximize) or maximizes(s.objective_key),
        constraints=[*map(parse_max, args.max or []), *map(parse_range, args.range or [])],
        budgets=s.budgets,
        scenario=scenario,
        solver_name=s.solver,
        num_solutions=s.num_solutions,
        min_diversity=s.min_diversity,
        time_limit_s=s.time_limit,
        sweep=SweepSpec.parse(args.sweep) if args.sweep else None,
        json_path=Path(args.json) if args.json else None,
        outside=run_outside_costs(Path(args.library)),
    )


def cmd_lower_standalone(args: argparse.Namespace) -> None:
    """`hwopt lower --model DIR --out DIR`: any checkpoint in the chosen formats, no run directory."""
    from hwopt.lowering.runtimes import resolve_runtime
    from hwopt.model_source import resolve_model
    from hwopt.passes.lower import LowerOptions, lower
    from hwopt.targets import resolve_target

    if not args.model:
        raise HwoptError("hwopt lower --out needs --model DIR (a Llama or nemotron-nas checkpoint)")
    target = resolve_target(args.target or "cpu")
    scenario = standalone_scenario(args, target)
    source = resolve_model(args.model)
    model = source.load()
    tokenizer = source.tokenizer() if any(Path(source.require_weights()).glob("tokenizer*")) else None
    options = LowerOptions(resolve_runtime(args.runtime, target), target, scenario, Path(args.model).name)
    lower(model, tokenizer, args.formats or ["nemotron-nas"], Path(args.out), options)
    print(f"wrote {', '.join(args.formats or ['nemotron-nas'])} into {args.out}")


def run_command(args: argparse.Namespace) -> None:
    if args.command == "plugins":
        return cmd_plugins()
    if args.command == "estimate":
        return cmd_estimate(args)
    if args.command == "calibrate":
        return cmd_calibrate(args)
    if args.command == "evaluate":
        return cmd_evaluate(args)
    if args.command == "targets":
        return cmd_targets()
    if args.command == "solve" and args.library:
        return cmd_solve_library(args)
    if args.command == "lower" and args.out:
        return cmd_lower_standalone(args)
    given = [f"--{k}" for k in LIBRARY_OPTIONS if vars(args).get(k) is not None]
    if given:
        raise HwoptError(f"{', '.join(given)}: only with --library FILE (in a run directory, the budgets are "
                         "--speedup, --memory, --throughput, --latency, --ttft, --params)")
    options = {name.replace("-", "_"): name for name in block_type_options()}
    skip = ("command", "workdir", "start", "until", "out", "force", *LIBRARY_OPTIONS, *options)
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    given = {name: vars(args)[dest] for dest, name in options.items() if vars(args).get(dest) is not None}
    if given:
        overrides["block_options"] = {**load_settings(args.workdir, {}).block_options, **given}
    settings = load_settings(args.workdir, overrides)
    settings.check_names()
    from hwopt.distributed import locked_for_job
    from hwopt.progress import console
    from hwopt.run import Run

    run = Run(args.workdir, settings)
    run.require_run(args.start if args.command == "optimize" else args.command)
    if not run.ranks.is_main:  # under torchrun, rank 0 speaks for the job
        console.quiet = True
    with locked_for_job(args.workdir, run.ranks), run.restoring_settings_on_failure():
        if args.command == "optimize":
            run.optimize(args.start, args.until, args.force)
        else:
            run.run_pass(args.command, args.force)
            run.say_what_is_out_of_date(args.command)
            if args.command == "lower" and run.ranks.is_main:
                run.print_child(report=False)


def command_of(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (its first word that is no option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def error_line(message: str) -> str:
    """The one line a bad input gets; under torchrun the job's other ranks learn it too (``announce_failure``,
    which needs torch: not imported for the error of a single process)."""
    if under_torchrun():
        from hwopt.distributed import announce_failure

        return announce_failure(message)
    return f"hwopt: error: {message}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(argv)).parse_args(argv)
    try:
        run_command(args)
    except HwoptError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwopt: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hwopt targets | head`: the reader has gone, so nothing more is printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 1
    except Exception:
        from hwopt.distributed import failure_elsewhere

        if (cause := failure_elsewhere()) is None:  # a failure of this rank's own: its traceback
            raise
        print(f"hwopt: rank {os.environ.get('RANK')}: stopped, {cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
