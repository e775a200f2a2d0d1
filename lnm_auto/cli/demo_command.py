"""lnm_demo and the lnm_convert entry (its parser and work live in lnm_auto.conversion)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lnm_auto.cli.common import _add_threads_flag, _run


# ---- lnm_demo -------------------------------------------------------------------------------------
def demo_parser() -> argparse.ArgumentParser:
    """The lnm_demo argument parser."""
    p = argparse.ArgumentParser(prog="lnm_demo", description="End to end on the embedded phantom: make data, plan, "
                                                             "cross-validate the configurations with the recommended "
                                                             "learning scheme, choose the model, predict the test "
                                                             "cases, evaluate beside the size rule.")
    p.add_argument("--workdir", default="lnm_demo_data", help="where everything is written (default: %(default)s)")
    p.add_argument("-c", "--configurations", nargs="+", default=["radiomics", "deep_radiomics", "2d25"],
                   help="configurations to cross-validate and choose from (default: %(default)s)")
    p.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="folds to train, pool for the choice and ensemble (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs of every network stage (default: %(default)s, a quick demo: on this phantom the "
                        "pretrained 2d25's validation AUROC peaks in its first epochs, e.g. 0.874, 0.855, 0.852 after "
                        "epochs 1-3 of one fold; the plans' own: 10-50 by the epoch rule, documentation/planning.md)")
    p.add_argument("--labeled_fraction", "--labeled-fraction", type=float, default=1.0,
                   help="fraction of training cases with node labels; below about 0.5 the plans recommend "
                        "supervised then PGLS (default: %(default)s)")
    p.add_argument("--cases", type=int, default=40, help="phantom training cases (default: %(default)s)")
    p.add_argument("--test_cases", "--test-cases", type=int, default=20, help="phantom test cases (default: %(default)s)")
    _add_threads_flag(p)
    return p


def _demo(args: argparse.Namespace) -> int:
    from lnm_auto.demo import run_demo
    from lnm_auto.utils.threads import requested_threads
    # -nt / $LNM_NUM_THREADS caps the cores the demo uses: that many folds train at once, one thread each
    run_demo(Path(args.workdir), tuple(args.configurations), tuple(args.folds), args.epochs, args.cases,
             args.test_cases, labeled_fraction=args.labeled_fraction, cores=requested_threads(args.num_threads))
    return 0


def demo_entry(argv: list[str] | None = None) -> int:
    """Run lnm_demo with ``argv``; returns the exit status."""
    return _run("lnm_demo", _demo, demo_parser(), argv)


def demo_cli() -> None:
    """Console entry point of lnm_demo."""
    sys.exit(demo_entry())


# ---- lnm_convert (parser and work in lnm_auto.conversion) ----------------------------------------
def convert_entry(argv: list[str] | None = None) -> int:
    """Run lnm_convert with ``argv``; returns the exit status."""
    from lnm_auto.cli.convert_commands import convert_entry as run_convert
    return run_convert(argv)


def convert_cli() -> None:
    """Console entry point of lnm_convert."""
    sys.exit(convert_entry())
