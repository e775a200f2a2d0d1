"""The cross-validation table of lnm_find_best_configuration: Markdown (AUROC [CI] per level, notes below) and a
bar plot of the selection level."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lnm_auto.utils.io import atomic_path
from lnm_auto.utils.plotting import pyplot


def _cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    ci = f" [{lo:.3f}, {hi:.3f}]" if np.isfinite([lo, hi]).all() else ""
    return f"{entry['auroc']:.3f}{ci} (n={entry['n']})"


def _ece_cell(entry: dict | None) -> str:
    if not entry or "ece" not in entry:
        return "-"
    return f"{entry['ece']:.3f} -> {entry['ece_calibrated']:.3f}"


def table_markdown(rows: list[dict], chosen: tuple[str, ...], levels: list[str], notes: list[str]) -> str:
    """Within-fold AUROC [patient-bootstrap 95% CI] per candidate (rows) and level (columns: ``levels``, those the
    data has), the node-level ECE raw -> calibrated (cross-fitted Platt), the chosen one marked; ``notes`` (levels
    left out, models left out, why the choice) as a list below."""
    ece = "node" in levels
    lines = ["| candidate | " + " | ".join(f"{lv} AUROC" for lv in levels) + (" | node ECE raw -> calibrated |"
                                                                             if ece else " |"),
             "|---|" + "---|" * (len(levels) + ece)]
    for r in rows:
        mark = " **(chosen)**" if tuple(r["members"]) == tuple(chosen) else ""
        lines.append(f"| {r['candidate']}{mark} | " + " | ".join(_cell(r.get(lv)) for lv in levels)
                     + (f" | {_ece_cell(r.get('node'))} |" if ece else " |"))
    lines += ["", "AUROC: within-fold (each fold's AUROC, weighted by its labelled pairs; folds' calibrations cannot "
                  "move it), with a patient-bootstrap 95% CI; n = labelled units."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


PLOT_DPI = 90


def plot_table(rows: list[dict], path: Path, chosen: tuple[str, ...], level: str) -> None:
    """Horizontal bars of the selection level's CV AUROC with its CI, the chosen candidate highlighted."""
    fig = table_figure(rows, chosen, level)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=PLOT_DPI)
    pyplot().close(fig)


def table_figure(rows: list[dict], chosen: tuple[str, ...], level: str):
    """The figure of :func:`plot_table`: short candidate names (:func:`short_names`), laid out by matplotlib's
    constrained layout so that no label is cut whatever their length."""
    shown = [r for r in rows if r.get(level)]
    names = short_names(rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(shown) + 1.6), dpi=PLOT_DPI, layout="constrained")
    for i, r in enumerate(shown):
        e = r[level]
        lo, hi = e["ci95"]
        colour = "tab:red" if tuple(r["members"]) == tuple(chosen) else ("tab:gray" if not r["members"] else "tab:blue")
        ax.barh(i, e["auroc"], color=colour)
        if np.isfinite([lo, hi]).all():
            ax.plot([lo, hi], [i, i], color="black", lw=1.2)
    ax.set_yticks(range(len(shown)), [names[r["candidate"]] for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.axvline(0.5, color="black", lw=0.5, ls=":")
    ax.set_xlabel(f"{level}-level within-fold CV AUROC\n(patient-bootstrap 95% CI; red = chosen, grey = size rule)",
                  fontsize=9)
    _widen_for_labels(fig, ax)
    return fig


def _widen_for_labels(fig, ax, bars_width_in: float = 5.0, margin_in: float = 0.4) -> None:
    """Make the figure as wide as the bars plus the longest candidate name as drawn, so the layout never has to
    squeeze the bars away (a three-member ensemble's name can be wider than the default figure)."""
    renderer = fig.canvas.get_renderer()
    labels = [t.get_window_extent(renderer).width for t in ax.get_yticklabels() if t.get_text()]
    widest_in = max(labels, default=0.0) / fig.dpi
    fig.set_figwidth(max(fig.get_figwidth(), bars_width_in + widest_in + margin_in))


def short_names(rows: list[dict]) -> dict[str, str]:
    """candidate -> how the plot names it: a model is its configuration, its trainer in brackets, and its plans
    name in square brackets only where another model of that configuration differs by the plans; in an ensemble
    the trainer too is shown only where it tells two models of a configuration apart. The Markdown table keeps
    the full model folder names."""
    models = {m for r in rows for m in r["members"]}
    # trainer, plans, configuration (a folder name of another shape is shown whole)
    parts = {m: m.split("__") if m.count("__") == 2 else [m, "", m] for m in models}

    def differs(m: str, i: int) -> bool:
        """Another model of m's configuration has another trainer (i=0) or plans (i=1)."""
        return any(parts[o][2] == parts[m][2] and parts[o][i] != parts[m][i] for o in models)

    def member(m: str, alone: bool) -> str:
        trainer, plans, config = parts[m]
        if not plans:
            return m
        return (config + (f" ({trainer})" if alone or differs(m, 0) else "")
                + (f" [{plans}]" if differs(m, 1) else ""))
    return {r["candidate"]: (" + ".join(member(m, len(r["members"]) == 1) for m in r["members"])
                             if r["members"] else r["candidate"]) for r in rows}


def plot_reliability(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, path: Path, name: str) -> None:
    """Reliability diagram of the chosen candidate's out-of-fold node probabilities, raw and calibrated
    (cross-fitted), with their ECE."""
    from lnm_auto.evaluation.metrics import calibration_bins, expected_calibration_error
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.6))
    for probs, label, colour in ((raw, "raw", "tab:gray"), (calibrated, "calibrated (cross-fitted)", "tab:red")):
        bins = calibration_bins(y, probs)
        mean_p, frac = np.asarray(bins["mean_probability"]), np.asarray(bins["fraction_positive"])
        ok = np.isfinite(frac)
        ax.plot(mean_p[ok], frac[ok], "o-", color=colour,
                label=f"{label}: ECE {expected_calibration_error(y, probs):.3f}")
    ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls=":", label="perfect calibration")
    ax.axhline(float(np.mean(y)), color="tab:blue", lw=0.6, ls="--", label=f"prevalence {np.mean(y):.2f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability (out of fold)")
    ax.set_ylabel("observed fraction metastatic")
    ax.set_title(f"{name}\n{len(y)} node-labelled out-of-fold nodes", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
