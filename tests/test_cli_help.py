"""Each command's help lists the options it reads, each with a help string; the rest stay accepted."""

from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from hwopt.cli import build_parser, main
from hwopt.pipeline import PASSES

REPO = Path(__file__).resolve().parents[1]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def shown_options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for a in parser._actions if a.help != argparse.SUPPRESS for flag in a.option_strings}


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {a.option_strings[0]}" for name, p in subparsers(build_parser()).items()
               for a in p._actions if a.option_strings and not (a.help or "").strip()]
    assert not missing, ", ".join(missing)


def test_solve_help_lists_only_what_solve_reads():
    solve = subparsers(build_parser("solve"))["solve"]
    shown = shown_options(solve)
    assert {"--speedup", "--solver", "--library", "--scenario", "--workdir", "--select-tokens"} <= shown
    assert not {"--uptrain-tokens", "--format", "--kv-heads", "--repeats", "--threads"} & shown
    help_text = solve.format_help()
    assert "--uptrain-tokens" not in help_text and "--speedup" in help_text


@pytest.mark.parametrize("command", ["lower", "profile"])
def test_a_section_whose_options_are_all_hidden_is_left_out(command):
    """`lower` reads no budget: its help has no `search:` heading, while `solve`'s has."""
    assert "\nsearch:\n" not in subparsers(build_parser(command))[command].format_help()
    assert "\nsearch:\n" in subparsers(build_parser("solve"))["solve"].format_help()


def test_an_option_left_out_of_a_pass_help_is_still_accepted():
    args = build_parser("solve").parse_args(["solve", "--uptrain-tokens", "4096", "--scenario", "512/256"])
    assert args.uptrain_tokens == 4096 and args.scenario == "512/256"


@pytest.mark.parametrize("option, default", [("--model", "smollm2-135m"), ("--target", "cpu"),
                                             ("--bld-lr", "0.0005"), ("--uptrain-lr", "0.0006"), ("--seed", "0"),
                                             ("--scenario", "128/64")])
def test_optimize_help_gives_the_settings_defaults(option, default):
    optimize = subparsers(build_parser("optimize"))["optimize"]
    action = next(a for a in optimize._actions if option in a.option_strings)
    assert f"default {default}" in action.help


def test_optimize_shows_every_pass_option():
    parsers = subparsers(build_parser())
    standalone = {"--out", "--library", "--max", "--range", "--maximize", "--sweep", "--json"}  # no run directory
    every_pass = set().union(*(shown_options(parsers[name]) for name in PASSES)) - standalone
    assert every_pass <= shown_options(parsers["optimize"])


@pytest.mark.parametrize(("command", "default"), [("estimate", "default: roofline"),
                                                  ("evaluate", "default: the run's, else roofline")])
def test_estimate_help_names_the_roofline_default_backend(command, default):
    p = subparsers(build_parser())[command]
    backend = next(a for a in p._actions if "--backend" in a.option_strings)
    assert default in backend.help


@pytest.mark.parametrize(("argv", "line"), [
    (["solve", "--speedup", "x"], "hwopt solve: error: argument --speedup: invalid finite value: 'x' "
                                  "(see hwopt solve --help)"),
    (["optimize", "--no-such-option"], "hwopt optimize: error: unrecognized arguments: --no-such-option "
                                       "(see hwopt optimize --help)"),
    (["optimise"], "hwopt: error: argument command: invalid choice: 'optimise'"),
])
def test_bad_usage_is_one_error_line(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(line)


def test_the_plans_benchmark_says_a_bad_model_in_one_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["plans.py", "--model", "nope", "--ranks", "1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "benchmarks/plans.py"), run_name="__main__")
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("plans.py: error: ") and "nope" in message
    assert len(message.splitlines()) == 1


def test_a_reader_that_stops_early_gets_no_traceback():
    """`hwopt targets | head -1`: the pipe closes before hwopt writes; it exits without a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "hwopt", "targets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has gone before hwopt has printed anything
    err = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err
