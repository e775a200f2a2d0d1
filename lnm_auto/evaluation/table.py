"""The text rendering of a metrics dict: one row per metric, one column per level, plus the comparison."""
from __future__ import annotations

import math

LEVELS = ("node", "station", "patient")          # the evaluated levels, in the order reports show them

# display names for format_table, in order
TABLE_ROWS = (
    ("auroc", "AUROC"), ("s_at_r75", "S@R75"), ("a_at_r75", "A@R75"), ("r_at_s75", "R@S75"),
    ("a_at_s75", "A@S75"), ("sensitivity_at_0.5", "Sens@0.5"), ("specificity_at_0.5", "Spec@0.5"),
    ("accuracy_at_0.5", "Acc@0.5"), ("brier", "Brier"), ("ece", "ECE"),
)


def format_number(v) -> str:
    """A metric value with three decimals, or "n/a" for None / NaN / inf."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _cell(entry) -> str:
    if not isinstance(entry, dict):
        return "n/a"
    v, ci = entry.get("value"), entry.get("ci95") or [None, None]
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if ci[0] is None or ci[1] is None or any(isinstance(c, float) and not math.isfinite(c) for c in ci):
        return f"{v:.3f}"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def format_table(document: dict) -> str:
    """Readable aligned table of a metrics.json document: one row per metric, one column per level
    (value [95% CI])."""
    metrics = document.get("levels", {})
    every = [lv for lv in LEVELS if isinstance(metrics.get(lv), dict)]
    levels = [lv for lv in every if not metrics[lv].get("absent")]     # a level not in the data gets no column
    header = ["metric"] + levels
    rows: list[list[str]] = []
    rows.append(["n (pos/neg)"] + [f"{metrics[lv].get('n', 0)} ({metrics[lv].get('n_pos', 0)}/"
                                   f"{metrics[lv].get('n_neg', 0)})" for lv in levels])
    rows.append(["patients"] + [str(metrics[lv].get("n_patients", "")) for lv in levels])
    for key, name in TABLE_ROWS:
        rows.append([name] + ["skipped" if "skipped" in metrics[lv] else _cell(metrics[lv].get(key))
                              for lv in levels])
    rows.append(["thr@R75"] + [format_number(metrics[lv].get("threshold_at_r75"))
                               if "skipped" not in metrics[lv] else "" for lv in levels])
    rows.append(["thr@S75"] + [format_number(metrics[lv].get("threshold_at_s75"))
                               if "skipped" not in metrics[lv] else "" for lv in levels])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    settings = document.get("settings", {})
    if settings:
        out.append(f"95% CI: percentile bootstrap over patients ({settings.get('n_bootstrap')} resamples, "
                   f"seed {settings.get('seed')}); roll-up: {settings.get('rollup')}")
    for lv in every:
        if "skipped" in metrics[lv]:
            out.append(f"{lv}: skipped ({metrics[lv]['skipped']})")
    derived = [f"{lv}: {metrics[lv]['labels']}" for lv in levels if lv != "node" and metrics[lv].get("labels")]
    if derived:
        out.append("reference labels: " + "; ".join(derived))

    comp = document.get("comparison")
    if comp:
        out.append("")
        ch = ["comparison", "AUROC A", "AUROC B", "A - B", "boot 95% CI", "DeLong z", "p"]
        crows = []
        for lv in LEVELS:
            c = comp.get(lv)
            if not c:
                continue
            ci = c.get("bootstrap_diff_ci95") or [None, None]
            ci_s = "n/a" if None in ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
            dl = c.get("delong", {})
            p = dl.get("p_value")
            crows.append([lv, format_number(c.get("auroc_a")), format_number(c.get("auroc_b")),
                          format_number(c.get("auroc_diff")), ci_s,
                          "n/a" if dl.get("z") is None else f"{dl['z']:.2f}",
                          "n/a" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")])
        cw = [max(len(r[i]) for r in [ch] + crows) for i in range(len(ch))]
        cl = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, cw)).rstrip()  # noqa: E731
        out += [cl(ch), "  ".join("-" * w for w in cw)] + [cl(r) for r in crows]
    warns = list(document.get("warnings", []))
    for lv in levels:
        warns += [f"{lv}: {w}" for w in metrics[lv].get("warnings", [])]
    if warns:
        out.append("")
        out += [f"warning: {w}" for w in warns]
    return "\n".join(out)
