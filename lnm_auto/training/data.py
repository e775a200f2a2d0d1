"""Training data: cached node crops -> augmented batches, produced in background workers.

The npz caches are unpacked once into plain .npy files (like nnU-Net's unpacking) and memory-mapped,
so RAM holds only the batches in flight, whatever the dataset size.
"""
from __future__ import annotations

import math
import os
import random
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import GammaTransform
from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from lnm_auto.networks.inputs import image_key, mask_key
from lnm_auto.networks.shape_head import SHAPE_FEATURES_KEY, shape_measurements
from lnm_auto.plans.plans import ChannelNormalization, ConfigurationPlan, Plans
from lnm_auto.preprocessing.normalization import normalize_channels
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path
from lnm_auto.utils.write_errors import make_folder
from lnm_auto.utils.processes import worker_process_init
from lnm_auto.utils.threads import available_cores

UNPACKED = "unpacked"
INTENSITY = "intensity"     # unpacked (2, C) array: the case statistics its crops were z-scored with


class CropStore:
    """Read node crops of many cases through memory maps (at most ``max_open`` cases mapped at once), normalized
    as the plans say (``normalization``: the caches hold crops z-scored per case)."""

    def __init__(self, crops_dir: Path, scales: tuple[str, ...], normalization: list[ChannelNormalization],
                 scales_digest: str, max_open: int = 64):
        self.crops_dir = Path(crops_dir)
        self.scales = scales
        self.normalization = list(normalization)
        self.scales_digest = scales_digest     # preprocessor.crops_digest of the plans' crop scales
        self.max_open = max_open
        self._open: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def unpack(self, case_ids) -> None:
        """npz -> one .npy per array (skipped when already there)."""
        out = make_folder(self.crops_dir / UNPACKED)
        for case_id in case_ids:
            npz = self.crops_dir / f"{case_id}.npz"
            if not npz.is_file():
                raise LNMError(f"{npz}: preprocessed case missing; run lnm_plan_and_preprocess for this dataset")
            targets = {f"{kind}_{s}": out / f"{case_id}__{kind}_{s}.npy" for s in self.scales for kind in ("image", "mask")}
            intensity = out / f"{case_id}__{INTENSITY}.npy"
            if all(t.is_file() and t.stat().st_mtime >= npz.stat().st_mtime for t in (*targets.values(), intensity)):
                continue
            try:
                with np.load(npz, allow_pickle=False) as f:
                    if "scales_digest" not in f.files or str(f["scales_digest"]) != self.scales_digest:
                        raise LNMError(f"{npz}: cut for other crop scales than the plans' (or by an older version); "
                                       "re-run lnm_plan_and_preprocess for these plans")
                    for key, target in targets.items():
                        if key not in f.files:
                            raise LNMError(f"{npz}: has no '{key}' crops; the plans changed, re-run "
                                           "lnm_plan_and_preprocess")
                        with atomic_path(target, suffix=".npy") as tmp:
                            np.save(tmp, f[key])
                    with atomic_path(intensity, suffix=".npy") as tmp:
                        np.save(tmp, np.stack([f["intensity_mean"], f["intensity_std"]]))
            except ValueError as e:
                if "allow_pickle" not in str(e):
                    raise LNMError(f"{npz}: damaged cache; re-run lnm_plan_and_preprocess (with --clean)") from None
                raise LNMError(f"{npz}: refused: it holds pickled Python objects, which could run code when loaded; "
                               "lnm_auto's caches hold plain arrays: re-run lnm_plan_and_preprocess --clean") from None
            except (OSError, EOFError, zipfile.BadZipFile):   # (a failed write of the .npy files is one line already)
                raise LNMError(f"{npz}: damaged cache; re-run lnm_plan_and_preprocess (with --clean)") from None

    def arrays(self, case_id: str) -> dict[str, np.ndarray]:
        """The memory-mapped crops of one case (image_<scale>, mask_<scale>)."""
        if case_id in self._open:
            self._open.move_to_end(case_id)
            return self._open[case_id]
        out = self.crops_dir / UNPACKED
        arrays = {f"{kind}_{s}": np.load(out / f"{case_id}__{kind}_{s}.npy", mmap_mode="r")
                  for s in self.scales for kind in ("image", "mask")}
        arrays[INTENSITY] = np.load(out / f"{case_id}__{INTENSITY}.npy")   # (2, C): the case's mean and std
        self._open[case_id] = arrays
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arrays

    def node(self, case_id: str, index: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, ...) normalized as the plans say, mask (...)) of one cached node at one scale."""
        a = self.arrays(case_id)
        mean, std = a[INTENSITY]
        return (normalize_channels(a[f"image_{scale}"][index], self.normalization, mean, std, axis=0),
                np.asarray(a[f"mask_{scale}"][index]))

    def __getstate__(self):  # worker processes re-open their own maps
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def load_batch(store: CropStore, records: pd.DataFrame, scales: tuple[str, ...]) -> dict:
    """The cached crops of ``records`` (rows of nodes_index.csv) in the batch vocabulary: ``image_<scale>``
    (B, C, ...), ``mask_<scale>`` (B, 1, ...), ``label`` (B,), ``keys`` [(case, node)] and ``shape_features``
    (B, 4) (networks/shape_head.py; absent for an index written before the caches held them)."""
    batch: dict = {}
    for s in scales:
        images, masks = zip(*(store.node(r.case, int(r.index), s) for r in records.itertuples()))
        batch[image_key(s)] = np.ascontiguousarray(np.stack(images))
        batch[mask_key(s)] = np.ascontiguousarray(np.stack(masks)[:, None].astype(np.float32))
    batch["label"] = records["label"].to_numpy(dtype=np.float32)
    batch["keys"] = list(zip(records["case"], records["node"].astype(int)))
    measurements = shape_measurements(records)
    if measurements is not None:
        batch[SHAPE_FEATURES_KEY] = measurements
    return batch


@dataclass
class BatchGroup:
    """One named part of every batch (``labelled``, ``unlabelled``, ``pseudo_labelled`` ...): ``n`` nodes
    drawn from ``records`` (label column = the training target), at least ``positive_fraction`` of them
    positive; each drawn node appears ``views`` times, each copy augmented independently (mean teacher:
    one view for the student, one for the teacher)."""
    name: str
    records: pd.DataFrame
    n: int
    positive_fraction: float = 0.0
    views: int = 1


class NodeBatchLoader(SlimDataLoaderBase):
    """Endless random batches made of named groups (e.g. labelled + unlabelled + pseudo-labelled nodes).
    ``batch["part"]`` holds each sample's group name, ``batch["view"]`` its view number."""

    def __init__(self, store: CropStore, groups: list[BatchGroup], scales, seed: int, num_threads: int = 1):
        super().__init__(None, sum(g.n * g.views for g in groups), num_threads)
        self.store, self.scales, self.seed = store, tuple(scales), seed
        self.groups = [BatchGroup(g.name, g.records.reset_index(drop=True), g.n, g.positive_fraction, g.views)
                       for g in groups]
        self.positives = [np.flatnonzero(g.records["label"].to_numpy() == 1) for g in self.groups]
        self.rs = np.random.RandomState(seed)
        self.creator_pid = os.getpid()

    def set_thread_id(self, thread_id):
        """Called in each worker: seeds node sampling and python's ``random`` (batchgenerators' noise
        transforms draw from it) per worker; a worker process also ends with the trainer that started it."""
        if os.getpid() != self.creator_pid:   # in a background augmenter process, not in-process loading
            worker_process_init(self.creator_pid)   # dies with the trainer; one thread per library
        super().set_thread_id(thread_id)
        worker_seed = (self.seed * 1009 + thread_id) % (2**32)
        self.rs = np.random.RandomState(worker_seed)
        random.seed(worker_seed)

    def draw(self, g: BatchGroup, positives: np.ndarray) -> np.ndarray:
        """Row positions of one group's nodes in a batch, positives oversampled."""
        n_pos = int(math.ceil(g.n * g.positive_fraction)) if len(positives) else 0
        return np.concatenate([self.rs.choice(positives, n_pos, replace=True) if n_pos else np.zeros(0, int),
                               self.rs.randint(0, len(g.records), g.n - n_pos)]).astype(int)

    def generate_train_batch(self) -> dict:
        """One batch of every group, in the batch vocabulary, with ``part`` and ``view``."""
        parts, part_names, view_ids = [], [], []
        for g, pos in zip(self.groups, self.positives):
            if g.n == 0 or g.records.empty:
                continue
            rows = g.records.iloc[self.draw(g, pos)]
            for v in range(g.views):
                parts.append(rows)
                part_names += [g.name] * len(rows)
                view_ids += [v] * len(rows)
        batch = load_batch(self.store, pd.concat(parts), self.scales)
        batch["part"], batch["view"] = np.asarray(part_names), np.asarray(view_ids)
        return batch


class SlicesToChannels(AbstractTransform):
    """(B, C, S, R, Cc) -> (B, C * S, R, Cc) so 2D spatial transforms treat every slice on its own
    (nnU-Net's "dummy 2D" augmentation for anisotropic data); remembers C for the way back."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys

    def __call__(self, **data):
        for k in self.keys:
            b, c, s, r, cc = data[k].shape
            data[f"{k}__channels"] = c
            data[k] = data[k].reshape(b, c * s, r, cc)
        return data


class ChannelsToSlices(AbstractTransform):
    """The inverse of :class:`SlicesToChannels`."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys

    def __call__(self, **data):
        for k in self.keys:
            c = data.pop(f"{k}__channels")
            b, cs, r, cc = data[k].shape
            data[k] = data[k].reshape(b, c, cs // c, r, cc)
        return data


def augmentation(plans: Plans, config: ConfigurationPlan) -> Compose:
    """The plan's augmentation per scale, applied per view on the cache crop; the spatial transform also
    crops to the network ROI. ``inplane_only`` plans rotate and scale each slice in 2D, so a slice's voxels
    only ever come from that slice."""
    a = config.augmentation
    angle = math.radians(a.rotation_deg)
    transforms = []
    for s in config.scales:
        roi, keys = plans.scales[s].roi_shape, (image_key(s), mask_key(s))
        spatial = dict(patch_center_dist_from_border=None, do_elastic_deform=False, do_rotation=True,
                       angle_x=(-angle, angle), angle_y=(0, 0), angle_z=(0, 0), do_scale=True, scale=a.scale_range,
                       border_mode_data="nearest", order_data=1, border_mode_seg="constant", order_seg=1,
                       random_crop=False, data_key=keys[0], label_key=keys[1], p_rot_per_sample=a.p_rotation,
                       p_scale_per_sample=a.p_scale)
        if a.inplane_only:
            transforms += [SlicesToChannels(keys), SpatialTransform(tuple(roi[1:]), **spatial), ChannelsToSlices(keys)]
        else:
            transforms.append(SpatialTransform(tuple(roi), **spatial))
        transforms += [
            GammaTransform(a.gamma_range, invert_image=False, per_channel=True, retain_stats=True,
                           p_per_sample=a.p_gamma, data_key=keys[0]),
            GaussianNoiseTransform(a.noise_variance, p_per_sample=a.p_noise, data_key=keys[0]),
            MirrorTransform(axes=a.mirror_axes, data_key=keys[0], label_key=keys[1]),
        ]
    return Compose(transforms)


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch as tensors on ``device``, same keys; ``part`` (each sample's group name) becomes
    ``parts``: {group name: boolean mask over the batch}."""
    out: dict = {}
    for key, value in batch.items():
        if key == "part":
            out["parts"] = {name: torch.from_numpy(value == name).to(device) for name in np.unique(value)}
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            dtype = torch.float32 if value.dtype.kind == "f" else (torch.bool if value.dtype.kind == "b" else torch.int64)
            out[key] = torch.from_numpy(np.ascontiguousarray(value)).to(device=device, dtype=dtype)
        else:
            out[key] = value
    return out


def default_num_workers(trainers_on_node: int = 1) -> int:
    """Background augmentation processes of one trainer: $LNM_n_proc_DA, else one less than its share of the
    cores (``trainers_on_node``: torchrun's processes on this node), at least 1."""
    env = os.environ.get("LNM_n_proc_DA")
    if env is not None:
        if not env.strip().isdigit():
            raise LNMError(f"$LNM_n_proc_DA must be a whole number of worker processes, got '{env}'")
        return int(env)
    return max(1, available_cores() // max(1, trainers_on_node) - 1)   # cores this process may use, not the host's


def training_batches(plans: Plans, config: ConfigurationPlan, loader: SlimDataLoaderBase, seed: int, num_workers: int):
    """An iterator of augmented batches from ``loader``; ``num_workers`` background processes (0 = here)."""
    transform = augmentation(plans, config)
    if num_workers == 0:
        loader.set_thread_id(0)
        np.random.seed(seed % (2**32))
        return SingleThreadedAugmenter(loader, transform)
    return MultiThreadedAugmenter(loader, transform, num_workers, num_cached_per_queue=2,
                                  seeds=[(seed * 31 + i) % (2**32) for i in range(num_workers)])
