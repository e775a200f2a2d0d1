"""A realistic synthetic chest CT / T2 MRI phantom with mediastinal lymph nodes (the project's own
test, demo and benchmark data; documentation/phantom.md).

Every case is drawn from its own random stream ``(seed, case index)``, so case ``phantom_007`` is the
same whatever the number of cases, and the same seed gives byte-identical files.

The anatomy is defined in the patient's own frame (LPS millimetres, centred on the body): x to the
patient's left, y posterior, z superior. The image grid is placed in that frame through its direction
matrix (the usual LPS flip ``diag(-1, -1, 1)``, optionally rotated about z by ``oblique_deg``), its
spacing and a non-trivial origin, so node stations stay anatomically consistent for any geometry.

Per case:
  1. a tissue class map, painted slice by slice from analytic shapes (torso with skin, subcutaneous
     fat, muscle, ribs, spine, sternum; lungs; trachea/bronchi, oesophagus, aorta with its arch and
     branches, SVC, pulmonary arteries, heart);
  2. intensities from a per-case jittered lookup (CT in HU, or T2 in arbitrary units) plus smooth
     tissue texture, fat septa and lung vessels;
  3. 3-12 lymph nodes in named stations (irregular ellipsoids, slice-thickness partial volume);
     metastatic nodes are on average larger, rounder, more heterogeneous, often necrotic, slightly
     denser, benign ones may show a fatty hilum or calcification - with overlap set by ``difficulty``;
  4. an in-plane point spread function, then noise: correlated Gaussian CT noise (stronger in the body
     centre) or, for MRI, a smooth multiplicative bias field and Rician noise.

Where each part lives (this package's modules):
  ``grid``       the image grid in the body frame and the random fields sampled on it;
  ``anatomy``    the tissue class map (step 1);
  ``intensity``  tissue values, texture and noise (steps 2 and 4);
  ``nodes``      node stations, appearance, rendering and placement (step 3);
  ``case``       ``PhantomConfig`` and ``generate_case``: one case from its random streams;
  ``labels``     which training cases keep node labels, and the node / station / patient tables;
  ``writer``     ``make_phantom_dataset``: the files of a dataset and its dataset.json.
"""
from __future__ import annotations

from lnm_auto.datasets.phantom.anatomy import N_CLASSES
from lnm_auto.datasets.phantom.case import PhantomCase, PhantomConfig, generate_case
from lnm_auto.datasets.phantom.intensity import CT_CLIP, CT_LUT, MRI_LUT
from lnm_auto.datasets.phantom.nodes import STATION_NAMES, STATIONS, PhantomNode, node_features
from lnm_auto.datasets.phantom.writer import FILE_ENDING, PHANTOM_VERSION, make_phantom_dataset

__all__ = ["CT_CLIP", "CT_LUT", "FILE_ENDING", "MRI_LUT", "N_CLASSES", "PHANTOM_VERSION", "STATIONS", "STATION_NAMES",
           "PhantomCase", "PhantomConfig", "PhantomNode", "generate_case", "make_phantom_dataset", "node_features"]
