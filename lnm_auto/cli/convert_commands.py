"""``lnm_convert``: bring data in the shape people have it into the raw dataset convention.

    lnm_convert nnunet -i nnUNet_raw/Dataset004_LNQ -d 4 [--label "lymph node"] [--labels_csv labels.csv]
    lnm_convert dicom -i patient_folder/ -o cases/                 (lnm_predict input layout)
    lnm_convert dicom -i patients/ -d 5 --name Hospital            (a raw dataset for training)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lnm_auto.cli.common import _run
from lnm_auto.imaging.components import DEFAULT_MIN_VOLUME_MM3
from lnm_auto.conversion.dicom import convert_dicom_folder
from lnm_auto.conversion.nnunet import convert_nnunet_dataset
from lnm_auto.utils.paths import base_folder


def convert_parser() -> argparse.ArgumentParser:
    """The lnm_convert parser with its two subcommands."""
    p = argparse.ArgumentParser(prog="lnm_convert", description="Convert an nnU-Net raw dataset or DICOM (series + "
                                "RTSTRUCT / DICOM-SEG) into lnm_auto's raw dataset convention, splitting binary "
                                "lymph-node masks into one instance per node (26-connected components).")
    sub = p.add_subparsers(dest="source", required=True, metavar="{nnunet,dicom}")

    nn = sub.add_parser("nnunet", help="an nnU-Net v2 raw dataset (imagesTr/, labelsTr/, dataset.json)",
                        description="nnU-Net v2 raw dataset -> $LNM_raw/DatasetYYY_Name")
    nn.add_argument("-i", "--input", required=True, help="the nnU-Net raw dataset folder, e.g. nnUNet_raw/Dataset004_LNQ")
    nn.add_argument("-d", "--dataset_id", type=int, required=True, help="id of the new lnm_auto dataset")
    nn.add_argument("--name", default=None, help="name of the new dataset (default: the nnU-Net dataset's name)")
    nn.add_argument("--label", default=None, metavar="NAME_OR_VALUE",
                    help="the lymph-node label in dataset.json \"labels\", by name (case insensitive) or value "
                         "(default: every label whose name mentions lymph/node/LN, or the only foreground label)")
    nn.add_argument("--labels_csv", default=None, metavar="CSV",
                    help="node labels case,node,label[,station] (node ids as numbered by the conversion) or patient "
                         "labels case,label (written to patients.csv) (default: none, labels left empty)")
    nn.add_argument("--link", action="store_true", help="hard-link the images instead of copying them (default: copy)")
    _add_common(nn)
    nn.set_defaults(func=_nnunet)

    dc = sub.add_parser("dicom", help="DICOM image series + RTSTRUCT or DICOM-SEG with node contours",
                        description="DICOM series + RTSTRUCT/DICOM-SEG -> NIfTI image + node instance mask. Every "
                                    "RTSTRUCT/SEG found below -i is one case, paired with the series it references.")
    dc.add_argument("-i", "--input", required=True, help="folder holding the series and the RTSTRUCT/SEG (searched "
                                                        "recursively; several cases allowed)")
    out = dc.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", default=None, help="write <case>_0000.nii.gz, <case>_nodes.nii.gz and "
                                                         "nodes.csv here (the lnm_predict input layout)")
    out.add_argument("-d", "--dataset_id", type=int, default=None,
                     help="add the cases to raw dataset DatasetYYY_<name> in $LNM_raw (created if new)")
    dc.add_argument("--name", default="DICOM", help="name of a new dataset with -d (default DICOM)")
    dc.add_argument("--test", action="store_true", help="with -d: add the cases to imagesTs/nodesTs (default: imagesTr)")
    dc.add_argument("--case", default=None, help="case id when -i holds one case (default: the PatientID)")
    dc.add_argument("--segment", action="append", default=None, metavar="NAME",
                    help="segment / ROI to use, case insensitive; repeat for several (default: every one whose name "
                         "mentions lymph/node/LN)")
    _add_common(dc)
    dc.set_defaults(func=_dicom)
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min_volume", type=float, default=DEFAULT_MIN_VOLUME_MM3, metavar="MM3",
                   help=f"components smaller than this are dropped as specks (default {DEFAULT_MIN_VOLUME_MM3:g} mm^3)")
    p.add_argument("--raw", default=None, metavar="DIR", help="raw data folder (default: $LNM_raw)")


def _nnunet(args: argparse.Namespace) -> int:
    summary = convert_nnunet_dataset(Path(args.input), base_folder("raw", args.raw), args.dataset_id, args.name,
                                     args.label, Path(args.labels_csv) if args.labels_csv else None, args.link,
                                     args.min_volume)
    for line in summary.lines:
        print(line)
    test = f" and {len(summary.test_node_counts)} test case(s)" if summary.test_node_counts else ""
    print(f"{summary.output}: {len(summary.node_counts)} training case(s){test}, "
          f"{sum(summary.node_counts.values())} node(s) from label value(s) {summary.label_values}; next: "
          f"lnm_plan_and_preprocess -d {args.dataset_id}")
    return 0


def _dicom(args: argparse.Namespace) -> int:
    raw = base_folder("raw", args.raw) if args.dataset_id is not None else None
    root, cases = convert_dicom_folder(Path(args.input), Path(args.output) if args.output else None, raw,
                                       args.dataset_id, args.name, args.test, args.case, args.segment, args.min_volume)
    for case in cases:
        print(case.note)
        for warning in case.warnings:
            print(f"lnm_convert: warning: {warning}", file=sys.stderr)
    print(f"{root}: {len(cases)} case(s), {sum(c.split.n_nodes for c in cases)} node(s); node labels are empty in "
          f"{'nodes.csv' if not args.test else 'nodesTs.csv'}: fill in the ones you know")
    return 0


def convert_entry(argv: list[str] | None = None) -> int:
    """Run lnm_convert with ``argv``; bad input gives one line per problem and exit status 1."""
    return _run("lnm_convert", lambda args: args.func(args), convert_parser(), argv)
