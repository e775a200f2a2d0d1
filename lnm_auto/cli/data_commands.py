"""lnm_make_phantom and lnm_plan_and_preprocess."""
from __future__ import annotations

import argparse
import sys

from lnm_auto.cli.common import _add_threads_flag, _add_location_flags, _add_progress_flag, _run
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.paths import base_folder

# the configurations every plan holds (planning/planner.py plan_experiment; a test keeps the two the same): -c is
# checked against them before the first image is read
PLANNED_CONFIGURATIONS = ("2d25", "3d_resenc", "radiomics", "deep_radiomics", "wega")


# ---- lnm_make_phantom -----------------------------------------------------------------------------
def make_phantom_parser() -> argparse.ArgumentParser:
    """The lnm_make_phantom argument parser."""
    p = argparse.ArgumentParser(prog="lnm_make_phantom",
                                description="Write a synthetic CT/MRI lymph node dataset in the raw dataset convention.")
    p.add_argument("-d", "--dataset_id", type=int, default=999, help="id of the new dataset (default: %(default)s)")
    p.add_argument("--name", default="Phantom", help="name of the new dataset (default: %(default)s)")
    p.add_argument("--cases", type=int, default=40, help="training cases (default: %(default)s)")
    p.add_argument("--test_cases", "--test-cases", type=int, default=10,
                   help="test cases, imagesTs/nodesTs (default: %(default)s)")
    p.add_argument("--modality", choices=["CT", "MRI"], default="CT", help="image modality (default: %(default)s)")
    p.add_argument("--labeled_fraction", "--labeled-fraction", type=float, default=1.0,
                   help="fraction of training cases that keep their node labels, the rest station/patient labels "
                        "only (default: %(default)s)")
    p.add_argument("--difficulty", type=float, default=0.5, help="0 easy .. 1 hard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--oblique_deg", "--oblique-deg", type=float, default=0.0,
                   help="rotate the image axes by this angle in degrees (default: %(default)s)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="voxels per image (default: 288 224 32; a clinical CT is about 512 512 80)")
    _add_location_flags(p, "raw")
    return p


def _make_phantom(args: argparse.Namespace) -> int:
    from lnm_auto.datasets.phantom import PhantomConfig, make_phantom_dataset
    if not 0.0 <= args.labeled_fraction <= 1.0:
        raise LNMError(f"--labeled_fraction must be within [0, 1], got {args.labeled_fraction}")
    if args.cases < 2:
        raise LNMError(f"--cases must be at least 2, got {args.cases}")
    config = PhantomConfig(n_cases=args.cases, n_test_cases=args.test_cases, modality=args.modality,
                           labeled_fraction=args.labeled_fraction, difficulty=args.difficulty, seed=args.seed,
                           oblique_deg=args.oblique_deg, **({"shape_xyz": tuple(args.shape)} if args.shape else {}))
    out = make_phantom_dataset(base_folder("raw", args.raw), args.dataset_id, args.name, config, progress=True)
    print(f"phantom dataset written to {out}")
    return 0


def make_phantom_entry(argv: list[str] | None = None) -> int:
    """Run lnm_make_phantom with ``argv``; returns the exit status."""
    return _run("lnm_make_phantom", _make_phantom, make_phantom_parser(), argv, uses_torch=False)


def make_phantom_cli() -> None:
    """Console entry point of lnm_make_phantom."""
    sys.exit(make_phantom_entry())


# ---- lnm_plan_and_preprocess ----------------------------------------------------------------------
def plan_and_preprocess_parser() -> argparse.ArgumentParser:
    """The lnm_plan_and_preprocess argument parser."""
    p = argparse.ArgumentParser(prog="lnm_plan_and_preprocess",
                                description="Verify a raw dataset, fingerprint it, plan every configuration and "
                                            "write the npz crop caches.")
    p.add_argument("-d", "--dataset", nargs="+", required=True, help="dataset id(s): 001, 1 or Dataset001_Name")
    p.add_argument("-pl", "--planner", default=None, choices=["LNMPlanner", "LNMPlannerCPU"],
                   help="LNMPlanner: GPU-sized networks; LNMPlannerCPU: CPU-sized (default: CPU unless CUDA is present)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="name of the plans file (default: %(default)s)")
    p.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (default: %(default)s)")
    p.add_argument("-c", "--configurations", nargs="+", default=None, metavar="CONFIGURATION",
                   help="nnU-Net's configurations to preprocess: here every configuration reads the same per-node "
                        "crop cache, so the caches are written for all of them either way; names that the planner "
                        f"does not plan ({', '.join(PLANNED_CONFIGURATIONS)}) are refused before any work "
                        "(default: all)")
    verify = p.add_mutually_exclusive_group()
    verify.add_argument("--verify", "--verify_dataset_integrity", dest="verify", action="store_true", default=True,
                        help="check the whole dataset first; nnU-Net's --verify_dataset_integrity is the same "
                             "(default: on)")
    verify.add_argument("--no_verify", "--no-verify", dest="verify", action="store_false",
                        help="skip the checks that only report, never those that keep the output right "
                             "(default: check)")
    p.add_argument("--clean", action="store_true",
                   help="redo every case and the folds it wrote, even if up to date; a splits_final.json you wrote is "
                        "kept (default: only what changed)")
    head = p.add_mutually_exclusive_group()
    head.add_argument("--shape_head", dest="shape_head", action="store_true", default=None,
                      help="hybrid head: the node's short/long axis, volume and sphericity join the final classifier "
                           "of 2d25 and 3d_resenc (a plan setting; default: the planner's, currently on)")
    head.add_argument("--no_shape_head", dest="shape_head", action="store_false",
                      help="image features only in the final classifier (default: the planner's, currently off)")
    p.add_argument("--no_pretrained_backbone", dest="pretrained_backbone", action="store_false", default=None,
                   help="2d25 trains its MobileNetV3 streams from scratch (a plan setting; default: fine-tune the "
                        "ImageNet-pretrained efficientnet_lite0, documentation/pretrained_weights.md)")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not write the crop caches (default: write them)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: bars on a terminal)")
    _add_progress_flag(p)
    p.add_argument("--split_components", nargs="?", type=float, const=10.0, default=None, metavar="MIN_MM3",
                   help="first turn binary node masks (nodesTr/, nodesTs/) into instance masks in place: one node per "
                        "26-connected component of at least MIN_MM3 (default 10) mm^3; originals kept in "
                        "nodesTr_binary/, new nodes added to nodes.csv with empty labels")
    _add_location_flags(p, "raw", "preprocessed")
    _add_threads_flag(p)
    return p


def check_configurations(names: list[str] | None) -> None:
    """-c names only configurations the planner plans (one line with the nearest name otherwise)."""
    from lnm_auto.utils.paths import nearest_hint
    for name in names or []:
        if name not in PLANNED_CONFIGURATIONS:
            planned = ", ".join(PLANNED_CONFIGURATIONS)
            raise LNMError(f"-c {name}: not a configuration the planner plans"
                           f"{nearest_hint(name, PLANNED_CONFIGURATIONS)} (planned: {planned})")


def _plan_and_preprocess(args: argparse.Namespace) -> int:
    from lnm_auto.planning.plan_and_preprocess import plan_and_preprocess
    check_configurations(args.configurations)
    from lnm_auto.utils.memory import reuse_freed_memory
    from lnm_auto.utils.terminal import show_progress
    reuse_freed_memory()    # every case's image buffers reuse the last case's instead of fresh pages
    raw, pre = base_folder("raw", args.raw), base_folder("preprocessed", args.preprocessed)
    progress = not args.quiet and show_progress()   # no bars where they would write \r into a log
    for d in args.dataset:
        r = plan_and_preprocess(d, raw, pre, args.planner, args.plans_name, max(1, args.num_processes),
                                args.verify, args.clean, not args.no_pp, progress, args.split_components,
                                shape_head=args.shape_head, pretrained_backbone=args.pretrained_backbone)
        g = r.plans.scales["global"]
        print(f"{r.preprocessed_dataset.name}: plans {r.plans_file} ({r.plans.planner}); target spacing "
              f"{_mm(r.plans.target_spacing_mm)} mm; ROI {'x'.join(map(str, g.roi_shape))} voxels = "
              f"{_mm(g.roi_size_mm)} mm; configurations {', '.join(r.plans.configurations)}"
              + ("; shape head on" if any(c.head_shape_features for c in r.plans.configurations.values()) else "")
              + (f"; crops in {r.crops_dir}" if r.crops_dir else ""))
    return 0


def _mm(values) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def plan_and_preprocess_entry(argv: list[str] | None = None) -> int:
    """Run lnm_plan_and_preprocess with ``argv``; returns the exit status."""
    return _run("lnm_plan_and_preprocess", _plan_and_preprocess, plan_and_preprocess_parser(), argv, uses_torch=False)


def plan_and_preprocess_cli() -> None:
    """Console entry point of lnm_plan_and_preprocess."""
    sys.exit(plan_and_preprocess_entry())
