"""What every trainer of one fold shares, whatever it fits: the fold's cases and nodes, the training log,
validation at the finest labelled level and its exported files (``validation/``), registration for ``-tr``.

``LNMTrainer`` (training/trainer.py) fits a network with the epoch loop; ``RadiomicsTrainer`` fits a classifier
in one step. Both implement ``run_training`` and ``predict_records``; everything else here they share.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lnm_auto.evaluation.report import metric_settings, metrics_document, validation_metrics
from lnm_auto.plans.plans import ConfigurationPlan, Plans
from lnm_auto.preprocessing.preprocessor import crops_digest
from lnm_auto.training import registry
from lnm_auto.training.data import CropStore, default_num_workers
from lnm_auto.training.distributed import DistributedRun
from lnm_auto.training.progress import TrainingLog
from lnm_auto.training.validation import auroc_or_nan, bce, passed_over, validation_level, validation_units
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, save_csv_atomic, save_json
from lnm_auto.utils.write_errors import make_folder


class FoldTrainer:
    """One fold's training run: its cases, log and validation. Subclasses fit a model (``run_training``) and score
    cached nodes with it (``predict_records``)."""

    def __init_subclass__(cls, register: bool = True, **kwargs):
        super().__init_subclass__(**kwargs)
        if register:   # selectable with lnm_train -tr NAME
            registry.register(cls)

    def __init__(self, plans: Plans, configuration: str, fold: int | str, preprocessed_dataset: Path,
                 output_folder: Path, device: str = "cpu", num_epochs: int | None = None, seed: int = 12345,
                 num_workers: int | None = None, splits: list[dict] | None = None, raw_root: Path | None = None):
        self.plans = plans
        self.raw_root = None if raw_root is None else Path(raw_root)   # the raw dataset's root (radiomics reads it)
        self.config = plans.configuration(configuration)
        self.fold = fold
        self.preprocessed_dataset = Path(preprocessed_dataset)
        self.output_folder = Path(output_folder)
        self.distributed = DistributedRun.current()   # a world of one outside torchrun / -num_gpus
        self.device = self.distributed.device(device)
        self.seed = seed
        self.num_epochs = int(num_epochs or self.default_num_epochs(self.config))
        self.epochs_given = num_epochs is not None   # --epochs / -tr NAME_<N>epochs: part of the run's name
        self.num_workers = num_workers if num_workers is not None else \
            default_num_workers(self.distributed.local_world_size)   # its share of the machine's cores
        self.splits = splits
        self.crops_dir = self.preprocessed_dataset / f"{plans.plans_name}_crops"
        self.current_epoch = 0
        self.initial_weights: str | None = None   # where the weights came from, if not a fresh start

    def initialize(self) -> None:
        """The file work before a run (``setup_trainer`` calls it; the constructor only stores its arguments): the
        fold's nodes and cases from the crop caches, the fold folder, the training log. Subclasses add theirs
        (a network trainer: its network and optimizer) after calling this."""
        index_file = self.crops_dir / "nodes_index.csv"
        if not index_file.is_file():
            raise LNMError(f"{index_file}: missing; run lnm_plan_and_preprocess -d {self.plans.dataset_name} first")
        self.nodes = pd.read_csv(index_file, dtype={"case": str, "station": str}, keep_default_na=False)
        self.train_cases, self.val_cases = self._fold_cases(self.splits)
        self.store = CropStore(self.crops_dir, self.config.scales, self.plans.normalization,
                               crops_digest(self.plans.scales))
        if self.distributed.is_main:
            make_folder(self.output_folder)
        self.log: TrainingLog = self.distributed.training_log(self.output_folder)   # training_log_<date>.txt per run

    @property
    def trainer_name(self) -> str:
        """The name this run is stored under (class + ``_<N>epochs`` for non-default epoch counts)."""
        return self.run_name(self.config, self.num_epochs if self.epochs_given else None)

    @classmethod
    def run_name(cls, config: ConfigurationPlan, num_epochs: int | None) -> str:
        """The model folder's trainer part for ``num_epochs`` given (--epochs, -tr NAME_<N>epochs) or None (the
        default): the one naming rule, for lnm_train's folder and the run's own checkpoints."""
        epochs = num_epochs or cls.default_num_epochs(config)
        return registry.trainer_name(cls.__name__, epochs, cls.default_num_epochs(config),
                                     cls.paired_default_epochs(config) if num_epochs is not None else None)

    @classmethod
    def default_num_epochs(cls, config: ConfigurationPlan) -> int:
        """The default number of epochs (the plan's)."""
        return config.recipe.num_epochs

    @classmethod
    def paired_default_epochs(cls, config: ConfigurationPlan) -> int | None:
        """The default epochs of the run this one continues (None: it continues none); see registry.trainer_name."""
        return None
    # ---- what a subclass implements -------------------------------------------------------------------
    def run_training(self, stop_after_epoch: int | None = None) -> None:
        """Fit the fold's model, save it into the fold folder and export the fold's validation."""
        raise NotImplementedError

    def predict_records(self, records: pd.DataFrame) -> np.ndarray:
        """Probabilities of the fold's model for cached nodes (rows of nodes_index.csv), in their order."""
        raise NotImplementedError

    # ---- what to learn from, what to validate on ---------------------------------------------------------
    def training_records(self) -> pd.DataFrame:
        """Nodes this trainer learns from: the node-labelled nodes of the training cases."""
        df = self.nodes[self.nodes["case"].isin(self.train_cases) & (self.nodes["label"] >= 0)]
        if df.empty:
            raise LNMError(f"fold {self.fold} has no node-labelled training nodes; this trainer needs node labels "
                           "(LNMTrainerWeak learns from station and patient labels, see documentation/training.md)")
        return df

    def validation_records(self) -> pd.DataFrame:
        """Every node of the validation cases (the level they are scored at is chosen from their labels)."""
        return self.nodes[self.nodes["case"].isin(self.val_cases)]

    # ---- validation ----------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Loss and AUROC on the validation cases at the finest labelled level; ``nodes``: every validation node
        with its probability (labelled or not)."""
        records = self.validation_records()
        nodes = records.assign(probability=self.predict_records(records)) if len(records) else None
        level = validation_level(records) if len(records) else None
        if level is None:
            return {"loss": float("nan"), "auroc": float("nan"), "level": "no", "units": None, "nodes": nodes}
        units = validation_units(records, nodes["probability"].to_numpy(), level)
        y, p = units["label"].to_numpy(), units["probability"].to_numpy()
        return {"loss": bce(y, p), "auroc": auroc_or_nan(y, p), "level": level, "units": units, "nodes": nodes}

    def say_validation_level(self) -> None:
        """The log line saying at which label level the fold's validation cases are scored, and on how many."""
        records = self.validation_records()
        level = validation_level(records) if len(records) else None
        if level is None:
            self.log.print(f"WARNING: fold {self.fold} has no labelled validation case at any level: no validation "
                           "AUROC, no checkpoint_best.pth (use more folds' data or add labels)")
            return
        units = validation_units(records, np.zeros(len(records)), level)
        n_pos = int(units["label"].sum())
        note = "" if 0 < n_pos < len(units) else " WARNING: one class only, so no AUROC and no checkpoint_best.pth"
        self.log.print(f"validation at {level} level{passed_over(records, level)}: {len(units)} labelled units "
                       f"({n_pos} positive){note}")

    def export_validation(self, checkpoint: str = "checkpoint_final.pth", save_probabilities: bool = False) -> None:
        """validation/<level>s.csv (the fold's labelled validation units by the model as loaded from
        ``checkpoint``, named in metrics.json), validation/metrics.json (documentation/outputs.md),
        validation/predictions.csv (every validation node, labelled or not: what lnm_find_best_configuration
        pools) and, with ``save_probabilities``, validation/probabilities.npz (case, node, probability)."""
        val = self.validate()
        if not self.distributed.is_main:   # every rank predicted its shard; rank 0 writes
            return
        out = self.output_folder / "validation"
        source = {"model_folder": str(self.output_folder.parent), "fold": str(self.fold), "checkpoint": checkpoint,
                  "validation_level": val["level"] if val["units"] is not None else "none"}
        nodes = val["nodes"]
        if nodes is not None:
            save_csv_atomic(nodes[["case", "node", "station", "label", "station_label", "patient_label",
                                   "probability"]], out / "predictions.csv")
        if save_probabilities and nodes is not None:   # nnU-Net's --npz
            with atomic_path(out / "probabilities.npz", suffix=".npz") as tmp:
                # plain str / int / float arrays: np.load(..., allow_pickle=False) reads them
                np.savez_compressed(tmp, case=nodes["case"].to_numpy().astype(str),
                                    node=nodes["node"].to_numpy().astype(np.int64),
                                    probability=nodes["probability"].to_numpy(np.float64))
        if val["units"] is None:
            save_json(metrics_document("validation", source, metric_settings(0, 0), {}, ["no labelled validation data"]),
                      out / "metrics.json")
            self.log.print(f"validation of fold {self.fold}: no labelled validation data")
            return
        units = val["units"]
        save_csv_atomic(units, out / f"{val['level']}s.csv")
        metrics = validation_metrics(units, val["level"], source)
        save_json(metrics, out / "metrics.json")
        auroc = metrics["levels"][val["level"]].get("auroc", {}).get("value")
        self.log.print(f"validation of fold {self.fold} with {checkpoint} at {val['level']} level: AUROC "
                       f"{float('nan') if auroc is None else auroc:.4f} on {len(units)} {val['level']}s -> {out}")

    # ---- folds ------------------------------------------------------------------------------------
    def _fold_cases(self, splits: list[dict] | None) -> tuple[list[str], list[str]]:
        all_cases = sorted(self.nodes["case"].unique())
        if self.fold == "all":
            return all_cases, all_cases   # no held-out data: validation is on the training cases
        if splits is None:
            raise LNMError("splits are needed for a numbered fold")
        k = int(self.fold)
        if not 0 <= k < len(splits):
            raise LNMError(f"fold {k} is out of range: the splits have folds 0..{len(splits) - 1} (or use 'all')")
        return splits[k]["train"], splits[k]["val"]

