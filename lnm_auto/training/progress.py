"""Training log and progress.png (loss, AUROC, epoch time, learning rate panels, like nnU-Net's)."""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tqdm import tqdm  # noqa: E402

from lnm_auto.utils.io import atomic_path  # noqa: E402


def show_progress() -> bool:
    """Progress bars only on a terminal, and never with $LNM_NO_PROGRESS=1 (log files get whole lines)."""
    return os.environ.get("LNM_NO_PROGRESS", "0") != "1" and sys.stdout.isatty()


def progress_bar(total: int, desc: str, unit: str = "step") -> tqdm:
    """A tqdm bar that stays silent where it would write carriage returns into a log."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not show_progress())

LOG_KEYS = ("train_loss", "val_loss", "val_auroc", "ema_auroc", "lr", "epoch_time_s", "data_wait_fraction")


class TrainingLog:
    def __init__(self, log_file: Path):
        self.log_file = Path(log_file)
        self.values: dict[str, list[float]] = {k: [] for k in LOG_KEYS}

    def print(self, *parts, echo: bool = True) -> None:
        line = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}: " + " ".join(str(p) for p in parts)
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if echo:
            print(line, flush=True)

    def append(self, **values: float) -> None:
        for k, v in values.items():
            self.values[k].append(float(v))

    def state(self) -> dict:
        return {k: list(v) for k, v in self.values.items()}

    def load_state(self, state: dict) -> None:
        self.values = {k: list(state.get(k, [])) for k in LOG_KEYS}

    def plot(self, path: Path) -> None:
        v = self.values
        epochs = range(1, len(v["train_loss"]) + 1)
        fig, axes = plt.subplots(3, 1, figsize=(9, 11), sharex=True)
        ax = axes[0]
        ax.plot(epochs, v["train_loss"], "b-", label="train loss")
        ax.plot(epochs, v["val_loss"], "r-", label="val loss")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(epochs, v["val_auroc"], "g:", label="val AUROC")
        ax2.plot(epochs, v["ema_auroc"], "g-", label="val AUROC (EMA)")
        ax2.set_ylabel("AUROC")
        ax2.set_ylim(0, 1)
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [l.get_label() for l in lines], loc="lower left")
        axes[1].plot(epochs, v["epoch_time_s"], "b-", label="epoch time (s)")
        axes[1].plot(epochs, [100 * w for w in v["data_wait_fraction"]], "k:", label="waiting for data (%)")
        axes[1].legend()
        axes[2].plot(epochs, v["lr"], "b-", label="learning rate")
        axes[2].set_xlabel("epoch")
        axes[2].legend()
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)
