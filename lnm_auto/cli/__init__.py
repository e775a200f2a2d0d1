"""Command-line entry points, one module per group of commands. Argument parsing only: the work is done by
library functions.

At this boundary (cli/common.py): bad input (LNMError) is one line per problem and exit status 1, our own bugs
keep their traceback, and warnings raised inside third-party packages are hidden; lnm_auto's own warnings always
show. ``LNM_DEBUG=1`` shows every warning and the traceback of input errors too.
"""
from __future__ import annotations

import sys
from typing import Callable

from lnm_auto.cli.common import _run, debug_mode, hide_third_party_warnings  # noqa: F401  (tests, lnm_convert)
from lnm_auto.utils.errors import LNMError  # noqa: F401  (what the commands raise for bad input)
from lnm_auto.cli.data_commands import (make_phantom_cli, make_phantom_entry, make_phantom_parser,  # noqa: F401
                                        plan_and_preprocess_cli, plan_and_preprocess_entry, plan_and_preprocess_parser)
from lnm_auto.cli.detect_commands import train_detector_cli, train_detector_entry, train_detector_parser  # noqa: F401
from lnm_auto.cli.demo_command import convert_cli, convert_entry, demo_cli, demo_entry, demo_parser  # noqa: F401
from lnm_auto.cli.predict_commands import (evaluate_cli, evaluate_entry, evaluate_parser, export_cli,  # noqa: F401
                                           export_entry, export_parser, predict_cli, predict_entry, predict_parser)
from lnm_auto.cli.selection_commands import (accumulate_cli, accumulate_entry, accumulate_parser,  # noqa: F401
                                             find_best_cli, find_best_entry, find_best_parser)
from lnm_auto.cli.train_commands import (pretrain_cli, pretrain_entry, pretrain_parser, train_cli,  # noqa: F401
                                         train_entry, train_parser)
__all__ = ["main", "COMMANDS"] + [name for name in dir() if name.endswith(("_entry", "_parser", "_cli"))]

COMMANDS: dict[str, Callable[[list[str] | None], int]] = {
    "pretrain": pretrain_entry,
    "demo": demo_entry,
    "predict": predict_entry,
    "export_model": export_entry,
    "evaluate": evaluate_entry,
    "make_phantom": make_phantom_entry,
    "plan_and_preprocess": plan_and_preprocess_entry,
    "train": train_entry,
    "convert": convert_entry,
    "find_best_configuration": find_best_entry,
    "accumulate_crossval_results": accumulate_entry,
    "train_detector": train_detector_entry,
}


def main(argv: list[str] | None = None) -> int:
    """Run the lnm_auto command named by ``argv[0]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0].removeprefix("lnm_") not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: python -m lnm_auto COMMAND [args]\ncommands: {names}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0].removeprefix("lnm_")](argv[1:])
