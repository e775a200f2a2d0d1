"""Calibrate the CT phantom against real chest CT: fat/muscle HU distributions and image noise.

Real data: the chest CTs with lesion masks shipped in pyradiomics 3.0.1's source archive
(``bash benchmarks/get_pyradiomics_data.sh``). Both the real and the phantom images go through the same
measurement:

  body    largest connected component above -500 HU, holes filled slice by slice
  fat     body voxels in [-190, -30] HU, eroded by one voxel in-plane
  muscle  body voxels in [-29, 150] HU, eroded by two voxels in-plane (soft tissue)
  noise   hp_sd:  SD of the high-pass residual (image - in-plane Gaussian, sigma 1.5 mm) inside tissue
                  interiors (fat/muscle eroded by 3 mm in-plane), i.e. the fine-grained noise;
          roi_sd: median over those interiors of the local SD in 5 x 5 mm in-plane windows
                  (what a radiologist reads off a small ROI)

    python benchmarks/phantom_calibration.py [--pyradiomics-data DIR] [--cases 4] [--out DIR]

prints a table (real cases, their mean, phantom cases, their mean) and saves ``calibration.png`` with the
fat/muscle histograms and one slice of each side by side.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lnm_auto.datasets.phantom import PhantomConfig, generate_case, node_features  # noqa: E402

REAL_CASES = ("lung1", "lung2")
FAT_RANGE = (-190.0, -30.0)
MUSCLE_RANGE = (-29.0, 150.0)
STAT_KEYS = ("mean", "sd", "p5", "p25", "p50", "p75", "p95")


def default_data_dir() -> Path:
    return Path(os.environ.get("LNM_PYRADIOMICS_DATA", "/tmp/pyradiomics_data"))


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Largest component above -500 HU (drops the table), holes filled per slice (keeps the lungs)."""
    fg = hu > -500
    lab, n = ndi.label(fg)
    if n == 0:
        return fg
    sizes = ndi.sum(fg, lab, index=np.arange(1, n + 1))
    body = lab == (1 + int(np.argmax(sizes)))
    return np.stack([ndi.binary_fill_holes(s) for s in body])


def _erode2d(mask: np.ndarray, iterations: int) -> np.ndarray:
    if iterations <= 0:
        return mask
    st = np.zeros((1, 3, 3), bool)
    st[0] = ndi.generate_binary_structure(2, 1)
    return ndi.binary_erosion(mask, st, iterations=iterations)


def tissue_masks(hu: np.ndarray, spacing_xyz) -> dict[str, np.ndarray]:
    body = body_mask(hu)
    fat = body & (hu >= FAT_RANGE[0]) & (hu <= FAT_RANGE[1])
    muscle = body & (hu >= MUSCLE_RANGE[0]) & (hu <= MUSCLE_RANGE[1])
    interior = max(1, int(round(3.0 / spacing_xyz[0])))
    return {"body": body, "fat": _erode2d(fat, 1), "muscle": _erode2d(muscle, 2),
            "fat_interior": _erode2d(fat, interior), "muscle_interior": _erode2d(muscle, interior)}


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {k: float("nan") for k in STAT_KEYS}
    p = np.percentile(values, [5, 25, 50, 75, 95])
    return dict(mean=float(values.mean()), sd=float(values.std()), p5=p[0], p25=p[1], p50=p[2], p75=p[3], p95=p[4])


def measure(image: sitk.Image) -> dict:
    """HU statistics of fat and muscle and the two noise measures of one CT image."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    sp = image.GetSpacing()
    m = tissue_masks(hu, sp)
    out: dict = {"fat": _stats(hu[m["fat"]]), "muscle": _stats(hu[m["muscle"]])}
    sig = (0.0, 1.5 / sp[1], 1.5 / sp[0])
    resid = hu - ndi.gaussian_filter(hu, sig, truncate=3.0)
    win = (1, max(3, int(round(5.0 / sp[1])) | 1), max(3, int(round(5.0 / sp[0])) | 1))
    mean = ndi.uniform_filter(hu, win)
    local_sd = np.sqrt(np.maximum(ndi.uniform_filter(hu * hu, win) - mean * mean, 0.0))
    for t in ("fat", "muscle"):
        inner = m[f"{t}_interior"]
        out[t]["hp_sd"] = float(resid[inner].std()) if inner.any() else float("nan")
        out[t]["roi_sd"] = float(np.median(local_sd[inner])) if inner.any() else float("nan")
        out[t]["n"] = int(m[t].sum())
    lung = _erode2d(m["body"] & (hu < -500), 2)
    out["lung"] = _stats(hu[lung])
    out["body_fraction"] = float(m["body"].mean())
    return out


def _row(name: str, r: dict) -> str:
    cells = [name]
    for t in ("fat", "muscle"):
        s = r[t]
        cells += [f"{s['mean']:7.1f}", f"{s['sd']:5.1f}", f"{s['p5']:6.0f}", f"{s['p50']:6.0f}", f"{s['p95']:6.0f}",
                  f"{s['hp_sd']:5.1f}", f"{s['roi_sd']:5.1f}"]
    return " | ".join(cells)


def _mean_of(results: list[dict]) -> dict:
    out = {}
    for t in ("fat", "muscle"):
        out[t] = {k: float(np.mean([r[t][k] for r in results])) for k in STAT_KEYS + ("hp_sd", "roi_sd")}
    return out


def table(real: dict[str, dict], phantom: dict[str, dict]) -> str:
    head = ("case | fat mean | sd | p5 | p50 | p95 | hp_sd | roi_sd | muscle mean | sd | p5 | p50 | p95 | hp_sd | "
            "roi_sd")
    lines = [head, "-" * len(head)]
    lines += [_row(k, v) for k, v in real.items()]
    if real:
        lines.append(_row("REAL (mean)", _mean_of(list(real.values()))))
    lines += [_row(k, v) for k, v in phantom.items()]
    lines.append(_row("PHANTOM (mean)", _mean_of(list(phantom.values()))))
    lines += ["", "lung (body < -500 HU, eroded 2) | mean | sd | p5 | p50 | p95"]
    for k, v in list(real.items()) + list(phantom.items()):
        s = v["lung"]
        lines.append(f"{k} | {s['mean']:7.1f} | {s['sd']:5.1f} | {s['p5']:6.0f} | {s['p50']:6.0f} | {s['p95']:6.0f}")
    return "\n".join(lines)


def plot(real_imgs: dict[str, sitk.Image], phantom_imgs: dict[str, sitk.Image], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.8))
    bins = np.arange(-200, 161, 4)
    styled = [(k, v, "-") for k, v in real_imgs.items()] + [(k, v, "--") for k, v in phantom_imgs.items()]
    for name, img, style in styled:
        hu = sitk.GetArrayFromImage(img).astype(np.float32)
        body = body_mask(hu)
        ax[0].hist(hu[body & (hu > -200) & (hu < 160)], bins=bins, density=True, histtype="step", ls=style,
                   label=name)
    ax[0].axvspan(*FAT_RANGE, color="gold", alpha=0.12)
    ax[0].axvspan(*MUSCLE_RANGE, color="salmon", alpha=0.12)
    ax[0].set_title("body HU histogram (solid: real, dashed: phantom)")
    ax[0].set_xlabel("HU")
    ax[0].legend(fontsize=7)
    for i, (title, imgs) in enumerate((("real", real_imgs), ("phantom", phantom_imgs))):
        if not imgs:
            ax[1 + i].set_axis_off()
            continue
        name, img = next(iter(imgs.items()))
        img = sitk.DICOMOrient(img, "LPS")                  # same display orientation for both
        a = sitk.GetArrayFromImage(img)
        z = a.shape[0] // 2
        ax[1 + i].imshow(a[z], cmap="gray", vmin=-250, vmax=300, aspect=img.GetSpacing()[1] / img.GetSpacing()[0])
        ax[1 + i].set_title(f"{title}: {name}, slice {z} (W550/L25)")
        ax[1 + i].set_axis_off()
    # noise: high-pass residual histograms in fat interiors
    styled = [(k, v, "-") for k, v in real_imgs.items()] + [(k, v, "--") for k, v in phantom_imgs.items()]
    for name, img, style in styled:
        hu = sitk.GetArrayFromImage(img).astype(np.float32)
        sp = img.GetSpacing()
        m = tissue_masks(hu, sp)
        resid = hu - ndi.gaussian_filter(hu, (0.0, 1.5 / sp[1], 1.5 / sp[0]), truncate=3.0)
        ax[3].hist(resid[m["fat_interior"]], bins=np.arange(-40, 41, 1), density=True, histtype="step", ls=style,
                   label=name)
    ax[3].set_title("high-pass residual in fat interiors (noise)")
    ax[3].set_xlabel("HU")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def separability(n_cases: int, difficulty: float, seed: int) -> dict:
    """AUROC of size alone vs simple feature combinations on the phantom's nodes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    cfg = PhantomConfig(n_cases=n_cases, difficulty=difficulty, seed=seed)
    rows = [r for i in range(n_cases) for r in node_features(generate_case(i, cfg))]
    case = np.array([r[0] for r in rows])
    y, vol, p90, sd = (np.array([r[k] for r in rows], float) for k in (1, 2, 3, 4))
    X = np.stack([np.log(vol), p90, sd], axis=1)
    Z = (X - X.mean(0)) / X.std(0)
    cv = cross_val_predict(LogisticRegression(max_iter=1000), Z, y.astype(int), groups=case,
                           cv=GroupKFold(5), method="predict_proba")[:, 1]
    patients = [y[case == c].max() for c in np.unique(case)]
    return dict(nodes=len(y), positive=float(y.mean()), n_plus=float(np.mean(patients)),
                size=roc_auc_score(y, vol), p90=roc_auc_score(y, p90), solid_sd=roc_auc_score(y, sd),
                size_plus_sd=roc_auc_score(y, Z[:, 0] + Z[:, 2]), zsum=roc_auc_score(y, Z.sum(1)),
                logistic_cv=roc_auc_score(y, cv))


def time_dataset(n_cases: int) -> float:
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="lnm_phantom_timing_"))
    try:
        t0 = time.time()
        from lnm_auto.datasets.phantom import make_phantom_dataset
        make_phantom_dataset(tmp, 999, "Timing", PhantomConfig(n_cases=n_cases))
        return time.time() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyradiomics-data", type=Path, default=default_data_dir(),
                    help="folder with lung1_image.nrrd, lung2_image.nrrd (default $LNM_PYRADIOMICS_DATA or "
                         "/tmp/pyradiomics_data)")
    ap.add_argument("--cases", type=int, default=4, help="phantom cases to measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lnm_phantom_calibration")
    ap.add_argument("--separability-cases", type=int, default=40,
                    help="cases for the node AUROC check at each --separability-difficulty (0: skip)")
    ap.add_argument("--separability-difficulty", type=float, nargs="+", default=[0.5])
    ap.add_argument("--time-cases", type=int, default=0,
                    help="also time make_phantom_dataset for this many training cases (0: skip)")
    args = ap.parse_args(argv)

    real_imgs: dict[str, sitk.Image] = {}
    for c in REAL_CASES:
        f = args.pyradiomics_data / f"{c}_image.nrrd"
        if f.is_file():
            real_imgs[c] = sitk.ReadImage(str(f))
    if not real_imgs:
        print(f"note: no real CT found in {args.pyradiomics_data} (bash benchmarks/get_pyradiomics_data.sh); "
              "measuring the phantom only", file=sys.stderr)
    t0 = time.time()
    cfg = PhantomConfig(seed=args.seed, difficulty=args.difficulty)
    phantom_imgs = {f"phantom_{i:03d}": generate_case(i, cfg).image for i in range(args.cases)}
    t_gen = time.time() - t0
    real = {k: measure(v) for k, v in real_imgs.items()}
    phantom = {k: measure(v) for k, v in phantom_imgs.items()}
    print(table(real, phantom))
    print(f"(phantom: {args.cases} cases generated in {t_gen:.1f} s; fat = [{FAT_RANGE[0]:.0f}, {FAT_RANGE[1]:.0f}] HU "
          f"eroded 1 voxel, muscle = [{MUSCLE_RANGE[0]:.0f}, {MUSCLE_RANGE[1]:.0f}] HU eroded 2 voxels; hp_sd = SD of "
          "image - Gaussian(1.5 mm) in tissue interiors; roi_sd = median local SD in 5 x 5 mm windows)")
    png = args.out / "calibration.png"
    plot(real_imgs, dict(list(phantom_imgs.items())[:2]), png)
    print(f"plot: {png}")
    if args.separability_cases:
        print(f"\nnode separability ({args.separability_cases} cases, seed {args.seed}): AUROC of")
        print("difficulty | nodes | metastatic | N+ patients | size (voxels) | p90 HU | solid SD | size+SD | "
              "size+p90+SD | logistic CV")
        for d in args.separability_difficulty:
            r = separability(args.separability_cases, d, args.seed)
            print(f"{d:.2f} | {r['nodes']} | {r['positive']:.2f} | {r['n_plus']:.2f} | {r['size']:.3f} | "
                  f"{r['p90']:.3f} | {r['solid_sd']:.3f} | {r['size_plus_sd']:.3f} | {r['zsum']:.3f} | "
                  f"{r['logistic_cv']:.3f}")
    if args.time_cases:
        print(f"\nmake_phantom_dataset({args.time_cases} default cases): {time_dataset(args.time_cases):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
