"""lnm_find_best_configuration and lnm_accumulate_crossval_results."""
from __future__ import annotations

import argparse
import os
import sys

from lnm_auto.cli.common import _add_location_flags, _run
from lnm_auto.utils.paths import ENV_VARS, base_folder


# ---- lnm_find_best_configuration ------------------------------------------------------------------
def find_best_parser() -> argparse.ArgumentParser:
    """The lnm_find_best_configuration argument parser."""
    p = argparse.ArgumentParser(prog="lnm_find_best_configuration",
                                description="Score every trained model with all folds complete, and every ensemble "
                                            "of 2-3 of them, on the pooled out-of-fold predictions; choose one for "
                                            "lnm_predict (documentation/model_selection.md).")
    p.add_argument("dataset_id", nargs="?", default=None, metavar="DATASET",
                   help="dataset id: 001, 1 or Dataset001_Name, positional as in nnUNetv2_find_best_configuration "
                        "(put it before -f); or give -d (default: none, then -d is needed)")
    p.add_argument("-d", "--dataset", default=None, help="dataset id: 001, 1 or Dataset001_Name (default: the "
                                                         "positional DATASET)")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=None,
                   help="the folds whose validation predictions are pooled, e.g. -f 0 or -f 0 1 2 3 4 (default: every "
                        "planned fold)")
    p.add_argument("--max_members", type=int, default=3, help="largest ensemble tried (default: %(default)s)")
    p.add_argument("--n_bootstrap", type=int, default=1000,
                   help="patient-bootstrap resamples for the CIs (default: %(default)s)")
    p.add_argument("-p", "--plans_name", default="LNMPlans",
                   help="plans whose crop caches give the size-rule row (default: %(default)s)")
    _add_location_flags(p, "preprocessed", "results")
    return p


def _find_best(args: argparse.Namespace) -> int:
    from lnm_auto.evaluation.crossval import find_best_configuration, size_rule_table
    from lnm_auto.utils.paths import resolve_dataset_name
    results = base_folder("results", args.results)
    name = resolve_dataset_name(one_dataset(args.dataset_id, args.dataset), results)
    size_rule = None
    if args.preprocessed or os.environ.get(ENV_VARS["preprocessed"]):   # the size-rule row needs the crop caches
        crops = base_folder("preprocessed", args.preprocessed) / name / f"{args.plans_name}_crops"
        size_rule = size_rule_table(crops) if crops.is_dir() else None
    # the table is printed before the choice is written: lnm_predict -d never uses a choice nobody was shown
    out = find_best_configuration(results / name, args.folds, args.max_members, args.n_bootstrap, size_rule,
                                  show=lambda table: print(table, flush=True))
    chosen = " + ".join(out["chosen"]) or "the size rule (short axis)"
    print(f"chosen: {chosen} ({out['instructions']['selected_by']}, folds "
          f"{' '.join(out['instructions']['folds'])}); written: {results / name / 'inference_instructions.json'}, "
          "crossval_table.md, crossval_table.png")
    return 0


def one_dataset(positional: str | None, flag: str | None) -> str:
    """The dataset given either positionally (nnU-Net's habit) or with -d; both only when they agree."""
    from lnm_auto.utils.errors import LNMError
    if positional is None and flag is None:
        raise LNMError("no dataset given: lnm_find_best_configuration DATASET (or -d DATASET), e.g. "
                       "lnm_find_best_configuration 1 -f 0 1 2 3 4")
    if positional is not None and flag is not None and positional != flag:
        raise LNMError(f"two datasets given: {positional} (positional) and -d {flag}; give one")
    return positional if positional is not None else flag


def find_best_entry(argv: list[str] | None = None) -> int:
    """Run lnm_find_best_configuration with ``argv``; returns the exit status."""
    return _run("lnm_find_best_configuration", _find_best, find_best_parser(), argv)


def find_best_cli() -> None:
    """Console entry point of lnm_find_best_configuration."""
    sys.exit(find_best_entry())


# ---- lnm_accumulate_crossval_results --------------------------------------------------------------
def accumulate_parser() -> argparse.ArgumentParser:
    """The lnm_accumulate_crossval_results argument parser."""
    p = argparse.ArgumentParser(prog="lnm_accumulate_crossval_results",
                                description="Pool the out-of-fold validation predictions of one model's folds into "
                                            "<model>/crossval_results/nodes.csv.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id: 001, 1 or Dataset001_Name")
    p.add_argument("-c", "--configuration", required=True, help="configuration of the model, e.g. 2d25")
    p.add_argument("-tr", "--trainer", default="LNMTrainer", help="trainer run name (default: %(default)s)")
    p.add_argument("-p", "--plans_name", default="LNMPlans", help="plans name (default: %(default)s)")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=None,
                   help="the folds to pool, e.g. -f 0 1 2 3 4 (default: every planned fold)")
    _add_location_flags(p, "results")
    return p


def _accumulate(args: argparse.Namespace) -> int:
    from lnm_auto.evaluation.crossval_inputs import accumulate_crossval_results, fold_list, missing_folds
    from lnm_auto.utils.errors import LNMError
    from lnm_auto.utils.paths import resolve_dataset_name
    results = base_folder("results", args.results)
    folder = results / resolve_dataset_name(args.dataset, results) / f"{args.trainer}__{args.plans_name}__{args.configuration}"
    if not folder.is_dir():
        raise LNMError(f"{folder}: no such model folder{missing_model_hint(folder, args)}")
    folds = fold_list(args.folds, [folder])
    missing = missing_folds(folder, folds)
    if missing:
        raise LNMError(f"{folder}: fold {', '.join(map(str, missing))} has no validation/predictions.csv; train it "
                       "first or name the trained folds with -f")
    pooled = accumulate_crossval_results(folder, folds)
    print(f"{len(pooled)} nodes of {pooled['case'].nunique()} cases -> {folder / 'crossval_results' / 'nodes.csv'}")
    return 0


def missing_model_hint(folder, args: argparse.Namespace) -> str:
    """The exact -tr to pass when the trainer was trained under another name (``LNMTrainer_1epochs``), else the
    nearest model folder."""
    from lnm_auto.training.registry import exact_trainer_hint
    from lnm_auto.utils.paths import nearest_hint
    names = sorted(p.name for p in folder.parent.glob("*__*__*") if p.is_dir()) if folder.parent.is_dir() else []
    return (exact_trainer_hint(args.trainer, names, args.plans_name, args.configuration)
            or nearest_hint(folder.name, names))


def accumulate_entry(argv: list[str] | None = None) -> int:
    """Run lnm_accumulate_crossval_results with ``argv``; returns the exit status."""
    return _run("lnm_accumulate_crossval_results", _accumulate, accumulate_parser(), argv)


def accumulate_cli() -> None:
    """Console entry point of lnm_accumulate_crossval_results."""
    sys.exit(accumulate_entry())
