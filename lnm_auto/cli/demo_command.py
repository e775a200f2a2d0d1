"""lnm_demo and the lnm_convert entry (its parser and work live in lnm_auto.conversion)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lnm_auto.cli.common import _run


# ---- lnm_demo -------------------------------------------------------------------------------------
def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnm_demo", description="End to end on the embedded phantom: make data, plan, "
                                                             "train the folds, predict the test cases, evaluate.")
    p.add_argument("--workdir", default="lnm_demo_data", help="where everything is written (default: %(default)s)")
    p.add_argument("-c", "--configuration", default="2d25", help="configuration to train (default: %(default)s)")
    p.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="folds to train and ensemble (default: %(default)s)")
    p.add_argument("-tr", "--trainer", default="LNMTrainer_5epochs", help="trainer (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs (default: the trainer's)")
    p.add_argument("--cases", type=int, default=40, help="phantom training cases (default: %(default)s)")
    p.add_argument("--test-cases", type=int, default=20, help="phantom test cases (default: %(default)s)")
    return p


def _demo(args: argparse.Namespace) -> int:
    from lnm_auto.demo import run_demo
    run_demo(Path(args.workdir), args.configuration, tuple(args.folds), args.trainer, args.epochs, args.cases,
             args.test_cases)
    return 0


def demo_entry(argv: list[str] | None = None) -> int:
    return _run("lnm_demo", _demo, demo_parser(), argv)


def demo_cli() -> None:
    sys.exit(demo_entry())


# ---- lnm_convert (parser and work in lnm_auto.conversion) ----------------------------------------
def convert_entry(argv: list[str] | None = None) -> int:
    from lnm_auto.conversion.cli import convert_entry as run_convert
    return run_convert(argv)


def convert_cli() -> None:
    sys.exit(convert_entry())
