"""The node detector's nnU-Net prediction, run in a process of its own:
``python -m lnm_auto.detection.nnunet_predict JOB.json`` (written by ``detector.run_detector``).

nnU-Net's own ``initialize_from_trained_model_folder`` unpickles the checkpoints with ``weights_only=False`` (a
crafted checkpoint could run code); this builds the network from the model folder's plans.json and dataset.json
itself and reads each fold's checkpoint with ``torch.load(weights_only=True)``, allowing only the numpy scalar and
dtype types nnU-Net's checkpoints hold (its logged numbers), then hands them to ``nnUNetPredictor``'s
``manual_initialization``. nnU-Net's in-process (sequential) prediction returns each case's label map and
probabilities; they are saved as ``<case>.npz`` (plain arrays, read back with ``allow_pickle=False``): nothing
nnU-Net would pickle (its ``.pkl`` properties) is ever written or read.

Only the standard library, numpy, torch, nnunetv2 and lnm_auto.utils (the weights-only load) are imported here
(the parent checked the folder).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

# plain data types nnU-Net's checkpoints pickle besides tensors (numbers it logged as numpy scalars): a numpy scalar
# is rebuilt from its dtype and raw bytes, nothing is called that could run code
SAFE_NUMPY_TYPES = ("float16", "float32", "float64", "int32", "int64", "bool")
REFUSED = 3     # exit status: a checkpoint was refused; the reason is the last line on stderr


class Refused(Exception):
    """A checkpoint that is not weights only (or not nnU-Net's): one line for the parent."""


def safe_numpy_globals() -> list:
    """The numpy reconstruction functions and dtype classes ``torch.load(weights_only=True)`` may allow."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray.scalar, np.dtype]
    allowed += [type(np.dtype(name)) for name in SAFE_NUMPY_TYPES]
    return allowed


def load_weights(checkpoint: Path) -> tuple[dict, tuple | None]:
    """(network weights, test-time mirror axes) of one fold's checkpoint, read weights-only."""
    from lnm_auto.utils.checkpoints import load_weights_only
    from lnm_auto.utils.errors import LNMError
    try:
        ckpt = load_weights_only(checkpoint, "cpu", "detectors", safe_numpy_globals())
    except LNMError as e:
        raise Refused(str(e)) from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise Refused(f"{checkpoint}: no network_weights; not an nnU-Net v2 checkpoint")
    axes = ckpt.get("inference_allowed_mirroring_axes")
    return ckpt["network_weights"], tuple(int(a) for a in axes) if axes is not None else None


def build_predictor(job: dict):
    """nnUNetPredictor initialised from the model folder's plans and the weights-only checkpoints."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(job["model_folder"])
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(job["configuration"])
    weights, axes = [], None
    for fold in job["folds"]:
        w, fold_axes = load_weights(folder / f"fold_{fold}" / job["checkpoint"])
        weights.append(w)
        axes = fold_axes if axes is None else axes
    num_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, num_inputs, num_outputs,
                                     allow_init=True, deep_supervision=False)
    network.load_state_dict(weights[0])
    device = torch.device(job["device"])
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(job["mirror"]),
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, weights, dataset_json, job["trainer"], axes)
    return predictor


def predict_case(predictor, files: list[str], label: int, out_file: Path) -> None:
    """One case: nnU-Net's label map and the probability of ``label``, saved as plain arrays (atomic rename)."""
    results = predictor.predict_from_files_sequential([files], None, save_probabilities=True, overwrite=True)
    segmentation, probabilities = results[0]
    tmp = out_file.with_name(f".{out_file.name}.tmp.npz")
    np.savez_compressed(tmp, segmentation=np.asarray(segmentation).astype(np.int16),
                        probability=np.asarray(probabilities[label], dtype=np.float32))
    os.replace(tmp, out_file)


def main(argv: list[str]) -> int:
    import torch
    job = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(int(job["threads"]))
    try:
        predictor = build_predictor(job)
    except Refused as e:
        print(str(e), file=sys.stderr, flush=True)
        return REFUSED
    for case in job["cases"]:
        predict_case(predictor, case["files"], int(job["label"]), Path(case["output"]))
        print(f"detected: {case['case_id']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
