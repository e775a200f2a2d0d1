"""Whether progress bars may be drawn: only on a terminal (a log file gets whole lines, never carriage returns)."""
from __future__ import annotations

import os
import sys

NO_PROGRESS_ENV = "LNM_NO_PROGRESS"   # 1: no bars at all (also --disable_progress_bar)


def show_progress() -> bool:
    """Progress bars only on a terminal, and never with $LNM_NO_PROGRESS=1 (log files get whole lines)."""
    return os.environ.get(NO_PROGRESS_ENV, "0") != "1" and sys.stdout.isatty() and sys.stderr.isatty()
