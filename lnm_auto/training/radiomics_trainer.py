"""``lnm_train DATASET radiomics FOLD``: the classical configuration, trained like every other one.

Same folds, same fold folder, same ``validation/`` outputs and the same validation-level rule as the deep
configurations (FoldTrainer's folds, logging and validation export): only the model differs. The
model is IBSI node features (lnm_auto.radiomics, computed once per dataset from the raw images in $LNM_raw and
cached in the preprocessed folder) + a scikit-learn classifier chosen by patient-grouped inner CV on the
training fold, stored as JSON (``fold_<k>/radiomics_model.json``: no pickle, safe to share). There is no
epoch loop: fitting takes seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lnm_auto.plans.radiomics_topology import RadiomicsTopology
from lnm_auto.plans.plans import ConfigurationPlan
from lnm_auto.radiomics.classifier import MODEL_FILE_NAME, RadiomicsClassifier
from lnm_auto.radiomics.dataset_features import dataset_node_features
from lnm_auto.radiomics.features import FEATURE_COLUMNS
from lnm_auto.training.fold_trainer import FoldTrainer
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json

MODEL_FILE = MODEL_FILE_NAME


class RadiomicsTrainer(FoldTrainer):
    """Fits the radiomics classifier on the fold's node-labelled training nodes."""

    classifier: RadiomicsClassifier | None = None
    _features: pd.DataFrame | None = None
    topology_type: type = RadiomicsTopology   # the configuration's topology this trainer fits

    def initialize(self) -> None:
        super().initialize()
        self.check_configuration()

    @classmethod
    def default_num_epochs(cls, config: ConfigurationPlan) -> int:
        """One fit."""
        return 1

    def check_configuration(self) -> None:
        """Refuse, before any feature is computed, a configuration this trainer does not fit."""
        if type(self.config.network) is not self.topology_type:
            raise LNMError(f"{type(self).__name__} trains the '{self.topology_type.config_name}' configuration, not "
                           f"'{self.config.name}'")

    def radiomics_settings(self) -> RadiomicsTopology:
        """The feature settings (deep_radiomics: its radiomics part, so both share one feature cache)."""
        return self.config.network

    def feature_columns(self) -> list[str]:
        """The columns the classifier is fitted on, in order."""
        return list(FEATURE_COLUMNS)

    def features(self) -> pd.DataFrame:
        """Node features of every case (index (case, node)), computed once per dataset and cached."""
        if self._features is None:
            self._features = self.compute_features()
        return self._features

    def compute_features(self) -> pd.DataFrame:
        """The radiomics features of every raw training case (index (case, node)), from the per-case cache."""
        if self.raw_root is None:   # setup_trainer passes $LNM_raw or --raw; a trainer reads no environment
            raise LNMError(f"the {self.config.name} configuration reads the raw images: pass --raw FOLDER (or "
                           "export LNM_raw=/path/to/folder)")
        raw = self.raw_root / self.plans.dataset_name
        cache = self.preprocessed_dataset / f"{self.plans.plans_name}_radiomics"
        table = dataset_node_features(raw, self.radiomics_settings(), cache, max(1, self.num_workers),
                                      log=self.log.print)
        return table.set_index(["case", "node"])

    def feature_rows(self, records: pd.DataFrame) -> pd.DataFrame:
        """The feature rows of ``records`` (rows of nodes_index.csv), in their order."""
        keys = pd.MultiIndex.from_arrays([records["case"].astype(str), records["node"].astype(int)])
        missing = keys.difference(self.features().index)
        if len(missing):
            raise LNMError(f"radiomics features missing for node(s) {list(missing[:3])}: the raw dataset and the "
                           "preprocessed data disagree; re-run lnm_plan_and_preprocess")
        return self.features().loc[keys, self.feature_columns()]

    def patient_groups(self, records: pd.DataFrame) -> np.ndarray:
        """The patient of each record (inner CV never splits a patient)."""
        fingerprint = load_json(self.preprocessed_dataset / "dataset_fingerprint.json")
        return np.asarray([fingerprint["cases"][c].get("patient", c) for c in records["case"]])

    def training_records(self) -> pd.DataFrame:
        """The fold's node-labelled training nodes; when they hold one class only (sparse node labels), every node
        of a pathology-labelled station with the station's label instead, else of a labelled patient with the
        patient's (noisy, but the label levels the dataset has), said in the log."""
        nodes = self.nodes[self.nodes["case"].isin(self.train_cases)]
        for column, what in (("label", "node"), ("station_label", "station"), ("patient_label", "patient")):
            records = nodes[nodes[column] >= 0].assign(label=lambda d, c=column: d[c])
            if records["label"].nunique() == 2:
                if what != "node":
                    self.log.print(f"fold {self.fold}: the node labels of the training cases hold one class only; "
                                   f"the radiomics model learns from {what} labels given to their nodes instead")
                return records
        raise LNMError(f"fold {self.fold}: no label level of the training cases holds both classes; the radiomics "
                       "model cannot be fitted")

    def run_training(self, stop_after_epoch: int | None = None) -> None:
        """Fit, save radiomics_model.json, export the fold's validation like every configuration."""
        records = self.training_records()
        self.log.print(f"training {self.trainer_name} {self.plans.plans_name} {self.config.name} fold {self.fold}: "
                       f"{len(records)} node-labelled training nodes ({int((records.label == 1).sum())} positive)")
        self.say_validation_level()
        rows = self.feature_rows(records)
        self.classifier = RadiomicsClassifier(self.seed).fit(rows, records["label"].to_numpy(),
                                                             self.patient_groups(records))
        scores = ", ".join(f"{k} {v:.3f}" for k, v in self.classifier.inner_cv_auroc.items())
        self.log.print(f"{rows.shape[1]} features; inner-CV AUROC: {scores}; chosen: {self.classifier.chosen}")
        self.classifier.save(self.output_folder / MODEL_FILE)
        self.current_epoch = 1
        self.export_validation(MODEL_FILE)

    def predict_records(self, records: pd.DataFrame) -> np.ndarray:
        """Probabilities of the fitted classifier for cached nodes."""
        if self.classifier is None:
            path = self.output_folder / MODEL_FILE
            if not path.is_file():
                raise LNMError(f"{path}: missing; train this fold first")
            self.classifier = RadiomicsClassifier.load(path)
        return self.classifier.predict_proba(self.feature_rows(records)) if len(records) else np.zeros(0)

    def load_checkpoint(self, path: Path) -> dict:
        """Nothing to continue: the model is fitted in one step."""
        raise LNMError(f"the {self.config.name} configuration trains in one step: run lnm_train again without --c")

    def load_pretrained(self, path: Path) -> dict:
        """No network to initialise."""
        raise LNMError(f"the {self.config.name} configuration trains no network: -pretrained_weights does not apply")
