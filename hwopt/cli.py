"""The ``hwopt`` command line.

``hwopt optimize`` runs every pass; ``hwopt <pass>`` runs one. All of them
work on a run directory (``--workdir``) and share its settings. Errors in
the user's input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from hwopt import __version__
from hwopt.errors import HwoptError
from hwopt.run import PASSES, Run, load_settings


def _csv(cast):
    def parse(text: str):
        try:
            return [cast(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options every pass command takes; unset ones come from the run's run.json, then defaults."""
    g = p.add_argument_group("run")
    g.add_argument("--workdir", default="runs/default", help="run directory (default: runs/default)")
    g.add_argument("--model", help="model name (smollm2-135m, llama-3.1-8b, llama-3.1-70b) or checkpoint directory")
    g.add_argument("--target", help="hardware target: cpu, h100, a100, 4090, or a profile .toml")
    g = p.add_argument_group("scenario")
    g.add_argument("--scenario", help="INPUT/OUTPUT tokens per request (default 128/64)")
    g.add_argument("--batch", type=int, help="requests served together (default 1)")
    g.add_argument("--dtype", help="weights and activations dtype (default fp32)")
    g.add_argument("--backend", help="measurement backend (default torch)")
    g.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5)")
    g = p.add_argument_group("search space")
    g.add_argument("--kv-heads", type=_csv(int), help="KV-head counts to offer (default: every divisor)")
    g.add_argument("--ffn-fractions", type=_csv(float), help="FFN widths to offer (default 0.75,0.5,0.25)")
    g.add_argument("--no-linear", dest="linear", action="store_const", const=False, help="offer no linear blocks")
    g.add_argument("--no-noop", dest="no_op", action="store_const", const=False, help="offer no removed blocks")
    g = p.add_argument_group("data and training")
    g.add_argument("--data", nargs="+", help="text or JSONL files (default: Python's own documentation)")
    g.add_argument("--seq-len", type=int, help="tokens per training sequence (default 128)")
    g.add_argument("--bld-tokens", type=int, help="blockwise distillation tokens per variant (default 16384)")
    g.add_argument("--bld-lr", type=float)
    g.add_argument("--score-tokens", type=int, help="held-out tokens for scoring (default 512)")
    g.add_argument("--metric", dest="metrics", action="append",
                   help="replace-1-block metric (repeatable; default kl_div)")
    g.add_argument("--uptrain-tokens", type=int, help="global distillation tokens (default 16384)")
    g.add_argument("--uptrain-lr", type=float)
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("search")
    g.add_argument("--objective", help="library key to minimise (default: metrics.<first metric>)")
    g.add_argument("--speedup", type=float, help="child runtime at most parent runtime / X")
    g.add_argument("--memory", help="weights + KV cache at most this (e.g. 80GB, 300MiB)")
    g.add_argument("--throughput", type=float, help="at least this many tokens/s (input + output tokens)")
    g.add_argument("--solver", help="search backend (default scip)")
    g.add_argument("--format", dest="formats", action="append", help="output format (repeatable; default nemotron-nas)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwopt", description="Hardware-aware LLM optimisation (Puzzle).")
    parser.add_argument("--version", action="version", version=f"hwopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimize", help="run every pass: " + " -> ".join(PASSES))
    add_run_options(p)
    p.add_argument("--from", dest="start", choices=PASSES, default="profile")
    p.add_argument("--until", choices=PASSES, default="lower")
    for name in PASSES:
        add_run_options(sub.add_parser(name, help=f"run the {name} pass alone"))
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
    from hwopt.plugins import hardware_profiles

    for p in hardware_profiles():
        aliases = f" (aliases: {', '.join(p.aliases)})" if p.aliases else ""
        print(f"{p.name:<12} {p.kind}  {p.description}{aliases}")


def run_command(args: argparse.Namespace) -> None:
    if args.command == "plugins":
        return cmd_plugins()
    if args.command == "targets":
        return cmd_targets()
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "workdir", "start", "until")}
    run = Run(args.workdir, load_settings(args.workdir, overrides))
    if args.command == "optimize":
        run.optimize(args.start, args.until)
    else:
        run.run_pass(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_command(args)
    except HwoptError as exc:
        print(f"hwopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwopt: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
