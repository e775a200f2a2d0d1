"""Benchmark: lnm_plan_and_preprocess against what a user would run instead, nnU-Net v2's
nnUNetv2_plan_and_preprocess, on the same images (the node mask binarised as the label), the same
machine and the same process count: ratio of wall times and of peak memory.

nnU-Net is only a benchmark dependency: ``pip install -e .[bench]``. Without it this script says so and
exits 0.

    python benchmarks/nnunet_compare.py --quick     # 6 clinical-size cases, -np 2, nnU-Net's 3d_fullres only
    python benchmarks/nnunet_compare.py             # 40 small + 40 clinical-size, -np 2, nnU-Net's defaults
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (bench_env, dataset_dir, lnm_command, machine_header, make_phantom, run_timed,  # noqa: E402
                    write_results)
# the preprocessing benchmark's phantoms (run_all gives both one workdir, so they are made once)
from preprocessing_bound import CLINICAL_ID, CLINICAL_SHAPE, DATASET_ID  # noqa: E402


_NNUNET = ("import sys\n"
           "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry\n"
           "sys.argv[0] = 'nnUNetv2_plan_and_preprocess'\n"
           "plan_and_preprocess_entry()\n")


def nnunet_raw_dataset(lnm_raw_dataset: Path, nnunet_raw: Path, dataset_id: int) -> Path:
    """The same training images (linked) with binarised node masks as labels, in nnU-Net's raw layout."""
    import SimpleITK as sitk
    out = nnunet_raw / f"Dataset{dataset_id:03d}_LNMCompare"
    shutil.rmtree(out, ignore_errors=True)    # made fresh: the phantom may have been remade with another case count
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    info = json.loads((lnm_raw_dataset / "dataset.json").read_text())
    images = sorted((lnm_raw_dataset / "imagesTr").glob("*.nii.gz"))
    for image in images:
        link = out / "imagesTr" / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
    for mask_file in sorted((lnm_raw_dataset / "nodesTr").glob("*.nii.gz")):
        label_file = out / "labelsTr" / mask_file.name
        if not label_file.exists():
            mask = sitk.ReadImage(str(mask_file))
            label = sitk.Cast(mask > 0, sitk.sitkUInt8)
            label.CopyInformation(mask)
            sitk.WriteImage(label, str(label_file), useCompression=True)
    dataset_json = {"channel_names": info.get("channel_names", {"0": "CT"}), "labels": {"background": 0, "node": 1},
                    "numTraining": len(list((out / "labelsTr").glob("*.nii.gz"))), "file_ending": ".nii.gz"}
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 clinical-size cases, -np 2, nnU-Net 3d_fullres only")
    ap.add_argument("--cases", type=int, nargs=2, default=None, metavar=("SMALL", "CLINICAL"),
                    help="0 leaves a dataset out (default: 0 6 with --quick, else 40 40)")
    ap.add_argument("--processes", type=int, nargs="+", default=[2],
                    help="process counts, each for both tools (default: %(default)s; preprocessing_bound reports -np 1 vs 2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lnm_bench/preprocessing"))
    args = ap.parse_args(argv)
    if importlib.util.find_spec("nnunetv2") is None:
        print("nnunet_compare: skipped - nnunetv2 is not installed (pip install -e .[bench] installs it)")
        return 0
    small, clinical = args.cases or ((0, 6) if args.quick else (40, 40))   # quick: within run_all's 15 minutes
    header, env = machine_header(), bench_env(args.workdir)
    nn_root = args.workdir / "nnunet"
    nn_env = dict(env, nnUNet_raw=str(nn_root / "raw"), nnUNet_preprocessed=str(nn_root / "preprocessed"),
                  nnUNet_results=str(nn_root / "results"))
    configs = ["-c", "3d_fullres"] if args.quick else []
    rows = []
    for label, dataset_id, cases, shape in (("default phantom", DATASET_ID, small, None),
                                            ("512x512x80 CT", CLINICAL_ID, clinical, CLINICAL_SHAPE)):
        if not cases:
            continue
        make_phantom(args.workdir, dataset_id, cases, extra_args=("--shape", *shape) if shape else (), env=env)
        nnunet_raw_dataset(dataset_dir(args.workdir / "raw", dataset_id), nn_root / "raw", dataset_id)
        for np_ in args.processes:
            ours = run_timed(lnm_command("plan_and_preprocess", "-d", dataset_id, "-np", np_, "--clean", "--quiet"),
                             env=env)
            theirs = run_timed([sys.executable, "-c", _NNUNET, "-d", str(dataset_id), "-np", str(np_), "-npfp",
                                str(np_), "--verify_dataset_integrity", "--clean", *configs], env=nn_env)
            row = {"dataset": label, "-np": np_, "cases": cases,
                   "nnU-Net configurations": "3d_fullres" if configs else "default",
                   "lnm s": ours.wall_s, "nnU-Net s": theirs.wall_s, "time ratio lnm/nnU-Net": ours.wall_s / theirs.wall_s,
                   "lnm peak RSS MB": ours.peak_rss_mb, "nnU-Net peak RSS MB": theirs.peak_rss_mb,
                   "memory ratio": ours.peak_rss_mb / theirs.peak_rss_mb}
            if ours.peak_tree_rss_mb and theirs.peak_tree_rss_mb:
                row.update({"lnm all-process MB": ours.peak_tree_rss_mb,
                            "nnU-Net all-process MB": theirs.peak_tree_rss_mb})
            rows.append(row)
            print(row, flush=True)
    notes = ["both with --clean and dataset verification, process start included",
             "peak RSS MB: the largest single process; all-process MB: sampled sum over the process tree (psutil)",
             "nnU-Net reads the same image files (symlinks); its label = node mask > 0",
             f"nnU-Net {_version('nnunetv2')}"]
    write_results("nnunet_compare_quick" if args.quick else "nnunet_compare", header, rows, notes)
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
