"""The evaluation figures: ROC curves with the two operating points, and reliability diagrams.

One panel per evaluated level; each figure is written atomically as a PNG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lnm_auto.evaluation import metrics as M
from lnm_auto.evaluation.table import format_number
from lnm_auto.utils.io import atomic_path


def _new_figure(n_panels: int):
    """One panel per level; with no level to show, a single panel saying why."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * max(n_panels, 1), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, max(n_panels, 1), i + 1) for i in range(max(n_panels, 1))]
    if not n_panels:
        axes[0].text(0.5, 0.5, "no level has both\npositive and negative labels", ha="center", va="center")
        axes[0].set_axis_off()
    return fig, axes


def _save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


COMPARED = "compared"   # the legend's name of the --compare predictions when nobody says what they are


def plot_roc(plot_data: dict, path: Path, has_b: bool, compare_name: str = COMPARED) -> None:
    """ROC curve per level (and the compared predictions', ``has_b``, named ``compare_name`` in the legend, e.g.
    "size rule (short axis)") with S@R75 and R@S75 marked, as a PNG."""
    _save_figure(roc_figure(plot_data, has_b, compare_name), path)


def roc_figure(plot_data: dict, has_b: bool, compare_name: str = COMPARED):
    """The figure of :func:`plot_roc`."""
    from sklearn.metrics import roc_curve

    fig, axes = _new_figure(len(plot_data))
    for ax, (level, d) in zip(axes, plot_data.items()):
        res = d["res"]
        fpr, tpr, _ = roc_curve(d["y"], d["p"], drop_intermediate=False)
        auc = res["auroc"]
        ax.plot(fpr, tpr, color="C0", lw=1.6,
                label=f"AUROC {format_number(auc['value'])} "
                      f"[{format_number(auc['ci95'][0])}, {format_number(auc['ci95'][1])}]")
        if has_b and "pb" in d:
            fb, tb, _ = roc_curve(d["y"], d["pb"], drop_intermediate=False)
            ax.plot(fb, tb, color="C2", lw=1.2, ls="--", label=f"{compare_name}: AUROC {M.auroc(d['y'], d['pb']):.3f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
        # the operating points, located by the same rule as metrics.py (no interpolation)
        ir = int(np.argmax(tpr >= M.RECALL_TARGET))
        isp = int(np.sum(fpr <= 1.0 - M.SPECIFICITY_TARGET)) - 1
        ax.plot([fpr[ir]], [tpr[ir]], "o", color="C3",
                label=f"S@R75 {format_number(res['s_at_r75']['value'])} (t={format_number(res['threshold_at_r75'])})")
        ax.plot([fpr[isp]], [tpr[isp]], "s", color="C1",
                label=f"R@S75 {format_number(res['r_at_s75']['value'])} (t={format_number(res['threshold_at_s75'])})")
        ax.axhline(M.RECALL_TARGET, color="C3", lw=0.6, ls="--", alpha=0.5)
        ax.axvline(1 - M.SPECIFICITY_TARGET, color="C1", lw=0.6, ls="--", alpha=0.5)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("1 - specificity (FPR)")
        ax.set_ylabel("recall (TPR)")
        ax.set_title(f"{level} (n={res['n']}, pos={res['n_pos']})")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_calibration(plot_data: dict, path: Path) -> None:
    """Reliability diagram per level (fraction positive vs mean predicted probability per bin), as a PNG."""
    fig, axes = _new_figure(len(plot_data))
    for ax, (level, d) in zip(axes, plot_data.items()):
        res = d["res"]
        cal = res["calibration"]
        edges = np.asarray(cal["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        count = np.asarray(cal["count"], dtype=float)
        frac = np.array([np.nan if v is None else v for v in cal["fraction_positive"]], dtype=float)
        meanp = np.array([np.nan if v is None else v for v in cal["mean_probability"]], dtype=float)
        ax.bar(centers, np.nan_to_num(frac), width=edges[1] - edges[0], color="C0", alpha=0.25,
               edgecolor="C0", label="fraction positive per bin")
        ok = np.isfinite(frac)
        ax.plot(meanp[ok], frac[ok], "o-", color="C0", label="observed vs mean predicted")
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls=":", label="perfect calibration")
        for c, x, n in zip(centers, frac, count):
            if n > 0:
                ax.text(c, np.nan_to_num(x) + 0.015, f"{int(n)}", ha="center", fontsize=6, color="0.3")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed fraction positive")
        ax.set_title(f"{level}: Brier {format_number(res['brier']['value'])}, "
                     f"ECE {format_number(res['ece']['value'])}", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
