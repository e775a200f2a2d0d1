"""Training data: cached node crops -> augmented batches, produced in background workers.

The npz caches are unpacked once into plain .npy files (like nnU-Net's unpacking) and memory-mapped,
so RAM holds only the batches in flight, whatever the dataset size.
"""
from __future__ import annotations

import math
import random
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import GammaTransform
from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from lnm_auto.planning.plans import ConfigurationPlan, Plans
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path

UNPACKED = "unpacked"


class CropStore:
    """Read node crops of many cases through memory maps (at most ``max_open`` cases mapped at once)."""

    def __init__(self, crops_dir: Path, scales: tuple[str, ...], max_open: int = 64):
        self.crops_dir = Path(crops_dir)
        self.scales = scales
        self.max_open = max_open
        self._open: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def unpack(self, case_ids) -> None:
        """npz -> one .npy per array (skipped when already there)."""
        out = self.crops_dir / UNPACKED
        out.mkdir(exist_ok=True)
        for case_id in case_ids:
            npz = self.crops_dir / f"{case_id}.npz"
            if not npz.is_file():
                raise LNMError(f"{npz}: preprocessed case missing; run lnm_plan_and_preprocess for this dataset")
            targets = {f"{kind}_{s}": out / f"{case_id}__{kind}_{s}.npy" for s in self.scales for kind in ("image", "mask")}
            if all(t.is_file() and t.stat().st_mtime >= npz.stat().st_mtime for t in targets.values()):
                continue
            try:
                with np.load(npz, allow_pickle=False) as f:
                    for key, target in targets.items():
                        if key not in f.files:
                            raise LNMError(f"{npz}: has no '{key}' crops; the plans changed, re-run "
                                           "lnm_plan_and_preprocess")
                        with atomic_path(target, suffix=".npy") as tmp:
                            np.save(tmp, f[key])
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):
                raise LNMError(f"{npz}: damaged cache; re-run lnm_plan_and_preprocess (with --clean)") from None

    def arrays(self, case_id: str) -> dict[str, np.ndarray]:
        if case_id in self._open:
            self._open.move_to_end(case_id)
            return self._open[case_id]
        out = self.crops_dir / UNPACKED
        arrays = {f"{kind}_{s}": np.load(out / f"{case_id}__{kind}_{s}.npy", mmap_mode="r")
                  for s in self.scales for kind in ("image", "mask")}
        self._open[case_id] = arrays
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arrays

    def node(self, case_id: str, index: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
        a = self.arrays(case_id)
        return np.asarray(a[f"image_{scale}"][index], dtype=np.float32), np.asarray(a[f"mask_{scale}"][index])

    def __getstate__(self):  # worker processes re-open their own maps
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def load_batch(store: CropStore, records: pd.DataFrame, scales: tuple[str, ...]) -> dict:
    """Stack the cached crops of ``records`` (rows of nodes_index.csv): data_<scale> (B, C, ...),
    seg_<scale> (B, 1, ...)."""
    batch: dict = {}
    for s in scales:
        images, masks = zip(*(store.node(r.case, int(r.index), s) for r in records.itertuples()))
        img, msk = np.stack(images), np.stack(masks)[:, None].astype(np.float32)
        batch[f"data_{s}"], batch[f"seg_{s}"] = np.ascontiguousarray(img), np.ascontiguousarray(msk)
    batch["label"] = records["label"].to_numpy(dtype=np.float32)
    batch["keys"] = list(zip(records["case"], records["node"].astype(int)))
    return batch


@dataclass
class BatchGroup:
    """One part of every batch: ``n`` nodes drawn from ``records`` (label column = the training target),
    at least ``positive_fraction`` of them positive; each drawn node appears ``views`` times, each copy
    augmented independently (mean teacher: one view for the student, one for the teacher)."""
    records: pd.DataFrame
    n: int
    positive_fraction: float = 0.0
    views: int = 1


class NodeBatchLoader(SlimDataLoaderBase):
    """Endless random batches made of groups (e.g. labelled + unlabelled + pseudo-labelled nodes).
    ``batch["group"]`` tells each sample's group, ``batch["view"]`` its view number."""

    def __init__(self, store: CropStore, groups: list[BatchGroup], scales, seed: int, num_threads: int = 1):
        super().__init__(None, sum(g.n * g.views for g in groups), num_threads)
        self.store, self.scales, self.seed = store, tuple(scales), seed
        self.groups = [BatchGroup(g.records.reset_index(drop=True), g.n, g.positive_fraction, g.views) for g in groups]
        self.positives = [np.flatnonzero(g.records["label"].to_numpy() == 1) for g in self.groups]
        self.rs = np.random.RandomState(seed)

    def set_thread_id(self, thread_id):
        """Called in each worker: seeds node sampling and python's ``random`` (batchgenerators' noise
        transforms draw from it) per worker."""
        super().set_thread_id(thread_id)
        worker_seed = (self.seed * 1009 + thread_id) % (2**32)
        self.rs = np.random.RandomState(worker_seed)
        random.seed(worker_seed)

    def draw(self, g: BatchGroup, positives: np.ndarray) -> np.ndarray:
        n_pos = int(math.ceil(g.n * g.positive_fraction)) if len(positives) else 0
        return np.concatenate([self.rs.choice(positives, n_pos, replace=True) if n_pos else np.zeros(0, int),
                               self.rs.randint(0, len(g.records), g.n - n_pos)]).astype(int)

    def generate_train_batch(self) -> dict:
        parts, group_ids, view_ids = [], [], []
        for gi, (g, pos) in enumerate(zip(self.groups, self.positives)):
            if g.n == 0 or g.records.empty:
                continue
            rows = g.records.iloc[self.draw(g, pos)]
            for v in range(g.views):
                parts.append(rows)
                group_ids += [gi] * len(rows)
                view_ids += [v] * len(rows)
        batch = load_batch(self.store, pd.concat(parts), self.scales)
        batch["group"], batch["view"] = np.asarray(group_ids), np.asarray(view_ids)
        return batch


def augmentation(plans: Plans, config: ConfigurationPlan) -> Compose:
    """In-plane rotation (+-15 deg) and scaling (0.85-1.15), elastic off, gamma, Gaussian noise and in-plane
    mirroring, applied per view on the cache crop; the spatial transform also crops to the network ROI."""
    transforms = []
    for s in config.scales:
        scale = plans.scales[s]
        transforms += [
            SpatialTransform(scale.roi_shape, patch_center_dist_from_border=None, do_elastic_deform=False,
                             do_rotation=True, angle_x=(-math.pi / 12, math.pi / 12), angle_y=(0, 0), angle_z=(0, 0),
                             do_scale=True, scale=(0.85, 1.15), border_mode_data="nearest", order_data=1,
                             border_mode_seg="constant", order_seg=1, random_crop=False, data_key=f"data_{s}",
                             label_key=f"seg_{s}", p_rot_per_sample=0.3, p_scale_per_sample=0.3),
            GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3,
                           data_key=f"data_{s}"),
            GaussianNoiseTransform((0, 0.05), p_per_sample=0.15, data_key=f"data_{s}"),
            MirrorTransform(axes=(1, 2), data_key=f"data_{s}", label_key=f"seg_{s}"),
        ]
    return Compose(transforms)


def training_batches(plans: Plans, config: ConfigurationPlan, loader: SlimDataLoaderBase, seed: int, num_workers: int):
    """An iterator of augmented batches from ``loader``; ``num_workers`` background processes (0 = here)."""
    transform = augmentation(plans, config)
    if num_workers == 0:
        loader.set_thread_id(0)
        np.random.seed(seed % (2**32))
        return SingleThreadedAugmenter(loader, transform)
    return MultiThreadedAugmenter(loader, transform, num_workers, num_cached_per_queue=2,
                                  seeds=[(seed * 31 + i) % (2**32) for i in range(num_workers)])
