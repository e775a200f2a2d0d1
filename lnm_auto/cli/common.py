"""What every command shares at the command-line boundary.

At this boundary: bad input (LNMError) is one line per problem and exit status 1, our own bugs keep their
traceback, and warnings raised inside third-party packages (torch, pandas, scikit-learn, batchgenerators)
are hidden; lnm_auto's own warnings always show. ``LNM_DEBUG=1`` shows every warning and the traceback of
input errors too.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from typing import Callable

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.paths import check_plain_name
from lnm_auto.utils.terminal import NO_PROGRESS_ENV
from lnm_auto.utils.threads import configure_threads


DEBUG_ENV = "LNM_DEBUG"
OWN_PACKAGE = r"lnm_auto(\.|$)"
DEVICE_HELP = ("auto (cuda when available, then mps, then cpu; the command prints which), cuda, mps or cpu "
               "(default: %(default)s)")


def debug_mode() -> bool:
    """$LNM_DEBUG=1: every warning, and tracebacks for input errors too."""
    return os.environ.get(DEBUG_ENV, "0") == "1"


def hide_third_party_warnings() -> None:
    """Ignore warnings raised from modules outside lnm_auto (a torch FutureWarning at import, pandas and
    scikit-learn deprecations): users cannot act on them. Warnings attributed to lnm_auto code still show."""
    warnings.filterwarnings("ignore", module=f"(?!{OWN_PACKAGE})")


def _run(prog: str, fn: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
         argv: list[str] | None, uses_torch: bool = True) -> int:
    """Parse ``argv``, set threads and warning filters, run ``fn``; input errors become one line and exit 1.
    ``uses_torch=False``: the command never runs a network, so torch is not imported for it."""
    args = parser.parse_args(argv)
    debug = debug_mode()
    saved_no_progress = os.environ.get(NO_PROGRESS_ENV)
    if getattr(args, "disable_progress_bar", False):
        os.environ[NO_PROGRESS_ENV] = "1"    # the switch every progress bar reads, worker processes included
    try:
        with warnings.catch_warnings():      # filters restored afterwards (commands also run in-process)
            if debug:
                warnings.simplefilter("default")
            else:
                hide_third_party_warnings()
            configure_threads(getattr(args, "num_threads", None), uses_torch)   # before torch loads: threads.md
            check_path_names(args, parser)
            return int(fn(args) or 0)
    except LNMError as e:
        if debug:
            traceback.print_exc()
        for line in str(e).splitlines():
            print(f"{prog}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if saved_no_progress is None:
            os.environ.pop(NO_PROGRESS_ENV, None)
        else:
            os.environ[NO_PROGRESS_ENV] = saved_no_progress


# Arguments whose values become part of a path (a folder or file name): plain names only (utils/paths.py)
PATH_NAME_ARGUMENTS = ("dataset", "dataset_id", "configuration", "configurations", "trainer", "plans_name", "fold",
                       "folds", "checkpoint", "name", "case")


def check_path_names(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, with one line naming the flag, a name argument holding a path separator or '..'."""
    for dest in PATH_NAME_ARGUMENTS:
        value = getattr(args, dest, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None:
                check_plain_name(item, _flag_name(parser, dest))


def _flag_name(parser: argparse.ArgumentParser, dest: str) -> str:
    """How the user wrote the argument ``dest``: its first flag (``-p``), or its name for a positional one."""
    parsers = [parser] + [sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                          for sub in a.choices.values()]
    for p in parsers:
        for action in p._actions:
            if action.dest == dest:
                return action.option_strings[0] if action.option_strings else (action.metavar or dest)
    return dest


def _add_location_flags(p: argparse.ArgumentParser, *kinds: str) -> None:
    for kind in kinds:
        p.add_argument(f"--{kind}", default=None, metavar="DIR",
                       help=f"{kind} data folder (default: $LNM_{kind})")


def _add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disable_progress_bar", action="store_true",
                   help="no progress bars, whole lines only (same as $LNM_NO_PROGRESS=1; bars are off anyway when "
                        "stdout is not a terminal) (default: bars on a terminal)")


def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-nt", "--num_threads", type=int, default=None,
                   help="torch threads of this process; workers get one each (default: $LNM_NUM_THREADS, else the cores "
                        "this process may use: affinity and cgroup quota; documentation/threads.md)")


def _say_device(requested: str) -> str:
    """Resolve -device and print the choice (auto picks cuda, then mps, then cpu)."""
    from lnm_auto.utils.devices import resolve_device
    device = resolve_device(requested)
    how = "picked automatically: cuda > mps > cpu; choose with -device" if requested.lower() == "auto" else "-device"
    print(f"device: {device} ({how})", flush=True)
    return device


