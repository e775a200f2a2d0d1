"""How cross-validation ranks candidates, and which one it chooses.

Pooling the out-of-fold predictions of five fold models and computing one AUROC assumes the five
models are calibrated alike. When node labels are scarce they are not: a fold whose model outputs
0.45 everywhere and one that outputs 0.30 everywhere make the pooled AUROC measure *which fold a node
was in*. The score here compares only pairs that one model ranked:

    within-fold AUROC = sum_k C_k / sum_k P_k

where, in fold k, P_k = (labelled positives) x (labelled negatives) and C_k the concordant ones among
them (ties 1/2). It is the per-fold AUROC averaged with weights by labelled pairs, so a fold's
calibration offset (any monotone map of one fold's scores) cannot change it, and a fold with one class
only adds nothing instead of adding noise. Its uncertainty is the patient bootstrap (patients drawn with
replacement, each bringing its nodes, evaluated through the one weighted metric engine).

The choice uses the one-standard-error rule: among the candidates whose score is within one bootstrap
standard error of the best, the simplest (lowest ``simplicity`` key) wins. The candidates are scored on the same
units, so the standard error that matters is that of each candidate's *difference* from the best, taken over the
same resampled patients (paired): two candidates that rank the same hard nodes wrongly differ by far less than
either's own SE. The size rule is a candidate and the simplest of all, so when no model beats measuring the short
axis by more than that noise, the size rule is chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from lnm_auto.evaluation.metric_engine import CONFIDENCE, SortedScores, as_label_score_arrays
from lnm_auto.evaluation.statistics import _count_chunks, percentile_ci, resample_groups


@dataclass(frozen=True)
class FoldScore:
    """A candidate's within-fold AUROC, its patient-bootstrap standard error and 95 % CI."""

    auroc: float
    se: float
    ci95: tuple[float, float]
    n: int            # labelled units
    n_positive: int
    n_pairs: int      # (positive, negative) pairs inside a fold: what the score averages over
    # the score on each patient resample (NaN where a resample has no pair): paired differences between candidates
    # scored on the same units with the same seed
    replicates: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready (NaN stays NaN; the JSON writer turns it into null)."""
        return {"auroc": self.auroc, "se": self.se, "ci95": list(self.ci95), "n": self.n,
                "n_positive": self.n_positive, "n_pairs": self.n_pairs}


def _fold_pair_counts(y: np.ndarray, p: np.ndarray, folds: np.ndarray, weights: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(concordant, pairs) summed over folds for each row of unit weights (B, n)."""
    concordant = np.zeros(weights.shape[0])
    pairs = np.zeros(weights.shape[0])
    for k in np.unique(folds):
        in_k = np.flatnonzero(folds == k)
        if y[in_k].min() == y[in_k].max():
            continue                                # one class in this fold: no pair to rank
        engine = SortedScores(y[in_k], p[in_k])
        m = engine.metrics(weights[:, in_k][:, engine.order])
        fold_pairs = m["_n_pos"] * m["_n_neg"]
        concordant += np.where(fold_pairs > 0, np.nan_to_num(m["auroc"]) * fold_pairs, 0.0)
        pairs += fold_pairs
    return concordant, pairs


def within_fold_auroc(y_true: Sequence, scores: Sequence, folds: Sequence, groups: Sequence,
                      n_bootstrap: int = 1000, seed: int = 0) -> FoldScore:
    """The within-fold AUROC of labelled units (0/1 labels) with its patient-bootstrap SE and CI.

    ``folds``: the fold whose model predicted each unit; ``groups``: its patient (the bootstrap draws
    patients). NaN when no fold holds both classes; SE and CI NaN without resamples."""
    y, p = as_label_score_arrays(y_true, scores)
    folds = np.asarray(folds)
    if folds.shape != y.shape:
        raise ValueError(f"folds must have one entry per unit ({y.size}), got shape {folds.shape}")
    conc, pairs = _fold_pair_counts(y, p, folds, np.ones((1, y.size)))
    n_pairs = int(pairs[0])
    point = float(conc[0] / pairs[0]) if n_pairs else math.nan
    se, ci, replicates = math.nan, (math.nan, math.nan), None
    if n_pairs and n_bootstrap:
        codes, draws = resample_groups(groups, y.size, n_bootstrap, seed)
        replicates = np.full(n_bootstrap, np.nan)
        for start, counts in _count_chunks(draws, y.size):
            c, q = _fold_pair_counts(y, p, folds, counts[:, codes])
            with np.errstate(divide="ignore", invalid="ignore"):
                replicates[start:start + c.size] = np.where(q > 0, c / q, np.nan)
        valid = replicates[np.isfinite(replicates)]
        if valid.size >= 2:
            se = float(np.std(valid, ddof=1))
            ci = percentile_ci(valid, CONFIDENCE)
    return FoldScore(auroc=point, se=se, ci95=tuple(float(v) for v in ci), n=int(y.size),
                     n_positive=int(y.sum()), n_pairs=n_pairs, replicates=replicates)


def difference_se(best: FoldScore, other: FoldScore) -> float:
    """Bootstrap SE of ``best - other`` over the resamples both have (paired); without paired replicates, the
    best's own SE (NaN if it has none)."""
    if best.replicates is None or other.replicates is None or best.replicates.shape != other.replicates.shape:
        return best.se
    diff = best.replicates - other.replicates
    diff = diff[np.isfinite(diff)]
    return float(np.std(diff, ddof=1)) if diff.size >= 2 else best.se


def one_standard_error_choice(scores: Mapping[Hashable, FoldScore],
                              simplicity: Callable[[Hashable], tuple]) -> tuple[Hashable, dict]:
    """The simplest candidate whose score is within one SE of the best one's: its difference from the best is at
    most the paired bootstrap SE of that difference (``difference_se``).

    Returns (chosen, why): why = {"best", "best_auroc", "best_se", "tied", "difference_se"} (tied: every candidate
    within the band, simplest first; difference_se per candidate). Candidates with a NaN score are never chosen;
    a difference without a finite SE ties only when it is zero."""
    finite = {c: s for c, s in scores.items() if math.isfinite(s.auroc)}
    if not finite:
        raise ValueError("no candidate has a finite score")
    best = max(finite, key=lambda c: (finite[c].auroc, [-v for v in _as_floats(simplicity(c))]))
    ses = {c: (0.0 if c == best else difference_se(finite[best], s)) for c, s in finite.items()}
    tied = sorted((c for c, s in finite.items()
                   if finite[best].auroc - s.auroc <= (ses[c] if math.isfinite(ses[c]) else 0.0)), key=simplicity)
    return tied[0], {"best": best, "best_auroc": finite[best].auroc, "best_se": finite[best].se, "tied": tied,
                     "difference_se": ses}


def _as_floats(key: tuple) -> list[float]:
    """The numeric parts of a simplicity key (used only to break exact score ties toward simpler)."""
    return [float(v) for v in key if isinstance(v, (int, float))]
