"""Progress output that suits both a terminal and a log file, the per-run training log, and progress.png.

Progress bars (tqdm) only appear on a terminal; with stdout redirected to a file, with
``--disable_progress_bar`` or with ``$LNM_NO_PROGRESS=1`` every command prints whole lines instead, so
log files never hold carriage returns.
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

from typing import TYPE_CHECKING

from tqdm import tqdm

from lnm_auto.utils.io import append_text, atomic_path
from lnm_auto.utils.plotting import pyplot
from lnm_auto.utils.terminal import show_progress

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

PLOT_INTERVAL_S = 30.0     # progress.png is redrawn at most this often during training, and after the last epoch
FEW_POINTS = 25            # up to this many epochs every point gets a marker (one epoch is one point)


def progress_bar(total: int, desc: str, unit: str = "step") -> tqdm:
    """A tqdm bar that stays silent where it would write carriage returns into a log."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not show_progress())


class ItemProgress:
    """Progress over items (cases): a tqdm bar on a terminal; elsewhere (a log file, --disable_progress_bar,
    $LNM_NO_PROGRESS=1) one whole line per finished item, "predict 3/10: case_007"; nothing when ``quiet``."""

    def __init__(self, total: int, desc: str, unit: str = "item", quiet: bool = False):
        self.total, self.desc, self.done = total, desc, 0
        self.lines = not quiet and not show_progress()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=quiet or self.lines)

    def step(self, text: str = "") -> None:
        """One more item finished; ``text`` says which (and how it went)."""
        self.done += 1
        self.bar.update()
        if self.lines:
            print(f"{self.desc} {self.done}/{self.total}" + (f": {text}" if text else ""), flush=True)
        elif text:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        """Remove the bar (lines stay)."""
        self.bar.close()


def training_log_name(started: datetime.datetime | None = None) -> str:
    """training_log_<YYYY-MM-DD_HH_MM_SS>.txt: one log file per run or continuation, like nnU-Net's."""
    return f"training_log_{(started or datetime.datetime.now()):%Y-%m-%d_%H_%M_%S}.txt"


def training_logs(fold_folder: Path) -> list[Path]:
    """A fold's training logs, oldest run first (the timestamp in the name sorts chronologically)."""
    return sorted(Path(fold_folder).glob("training_log_*.txt"))


LOG_KEYS = ("train_loss", "val_loss", "val_auroc", "ema_auroc", "lr", "epoch_time_s", "data_wait_fraction")


class TrainingLog:
    """The run's text log (whole lines, timestamped) and the per-epoch values behind progress.png."""

    def __init__(self, log_file: Path):
        self.log_file = Path(log_file)
        self.values: dict[str, list[float]] = {k: [] for k in LOG_KEYS}
        self._last_plot = float("-inf")

    @classmethod
    def for_run(cls, fold_folder: Path) -> "TrainingLog":
        """A new timestamped log file in the fold folder for this run (earlier runs keep theirs)."""
        return cls(Path(fold_folder) / training_log_name())

    def print(self, *parts, echo: bool = True) -> None:
        """Append one timestamped line to the log file (and to stdout unless ``echo`` is False)."""
        line = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}: " + " ".join(str(p) for p in parts)
        append_text(self.log_file, line + "\n")
        if echo:
            print(line, flush=True)

    def append(self, **values: float) -> None:
        """Record one epoch's values."""
        for k, v in values.items():
            self.values[k].append(float(v))

    def state(self) -> dict:
        """The values, for the checkpoint."""
        return {k: list(v) for k, v in self.values.items()}

    def load_state(self, state: dict) -> None:
        """Restore the values from a checkpoint."""
        self.values = {k: list(state.get(k, [])) for k in LOG_KEYS}

    def figure(self) -> plt.Figure:
        """The progress figure: one quantity per panel (loss, AUROC, epoch time, data wait, learning rate),
        legends to the right of the curves, markers while there are few epochs."""
        plt = pyplot()
        from matplotlib.ticker import MaxNLocator
        v = self.values
        epochs = list(range(1, len(v["train_loss"]) + 1))
        marker = "o" if len(epochs) <= FEW_POINTS else None
        panels = [
            ("loss", [("train loss (sum over heads)", v["train_loss"], "tab:blue", "-"),
                      ("val loss (fused head)", v["val_loss"], "tab:red", "-")], None),
            ("AUROC", [("val AUROC", v["val_auroc"], "tab:green", ":"),
                       ("val AUROC, EMA (selects best)", v["ema_auroc"], "tab:green", "-")], (0, 1.02)),
            ("epoch time (s)", [("epoch time", v["epoch_time_s"], "tab:purple", "-")], None),
            ("waiting for data (%)", [("data wait", [100 * w for w in v["data_wait_fraction"]], "black", "-")],
             (0, 100)),
            ("learning rate", [("learning rate", v["lr"], "tab:orange", "-")], None),
        ]
        fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 * len(panels)), sharex=True)
        for ax, (ylabel, curves, ylim) in zip(axes, panels):
            for label, values, color, style in curves:
                ax.plot(epochs[:len(values)], values, linestyle=style, color=color, marker=marker, markersize=4,
                        label=label)
            ax.set_ylabel(ylabel)
            if ylim:
                ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize="small")
        axes[-1].set_xlabel("epoch")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))   # epochs are whole numbers
        if len(epochs) == 1:   # one point would otherwise sit on an x axis of width 0
            axes[-1].set_xlim(0.5, 1.5)
        fig.tight_layout()
        return fig

    def plot(self, path: Path, force: bool = True) -> None:
        """progress.png (written atomically). ``force=False``: only when the last one is at least
        PLOT_INTERVAL_S old - drawing costs ~1 s of CPU, a quarter of a short CPU epoch."""
        now = time.monotonic()
        if not force and now - self._last_plot < PLOT_INTERVAL_S:
            return
        self._last_plot = now
        fig = self.figure()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80, bbox_inches="tight")
        pyplot().close(fig)
