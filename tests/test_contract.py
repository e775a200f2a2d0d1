"""The plans as the whole contract between stages, and the pieces every stage shares: the planned cost
equals the real network's, augmentation and test-time mirroring come from the plans, one trainer
registry, one CSV reader, one JSON writer, one checkpoint reader."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lnm_auto.configurations.networks import network_for
from lnm_auto.networks import load_imagenet_backbones
from lnm_auto.networks.node_predictor import tta_flips
from lnm_auto.planning import planner
from lnm_auto.training.data import ChannelsToSlices, SlicesToChannels, augmentation
from lnm_auto.training.registry import split_trainer_name, trainer_class, trainer_name
from lnm_auto.training.weak import subsample_bag
from lnm_auto.utils.checkpoints import load_checkpoint, save_checkpoint
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import save_json
from lnm_auto.utils.tables import node_ids, parse_node_id, read_csv_text
from test_planning import make_fingerprint


def hand_plans(channels=None, spacing=(5.0, 0.8, 0.8), shape_head=None):
    fp = make_fingerprint([spacing] * 6, [(60, 256, 256)] * 6, [(10, 12, 12), (15, 20, 20), (8, 9, 9)] * 4,
                          channel_names=channels)
    if channels:
        fp["intensity_statistics"] = {k: {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}
                                      for k in channels}
    return planner.plan_experiment(fp, "LNMPlannerCPU", shape_head=shape_head)


@pytest.mark.parametrize("channels", [None, {"0": "T2", "1": "ADC"}])
@pytest.mark.parametrize("configuration", ["2d25", "3d_resenc"])
def test_planned_gflops_equal_flop_counter_with_real_channels(channels, configuration):
    plans = hand_plans(channels)
    config = plans.configuration(configuration)
    net = network_for(plans, config).eval()
    n_image = len(plans.normalization)
    batch = {}
    for s in config.scales:
        shape = plans.scales[s].roi_shape
        batch[f"image_{s}"], batch[f"mask_{s}"] = torch.randn(1, n_image, *shape), torch.ones(1, 1, *shape)
    batch["shape_features"] = torch.tensor([[8.0, 12.0, 500.0, 0.9]])   # read when the plan has the shape head
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(batch)
    assert config.estimated_gflops_per_sample > 0
    assert config.estimated_gflops_per_sample == pytest.approx(counter.get_total_flops() / 1e9, rel=0.05)


@pytest.mark.parametrize("configuration", ["2d25", "3d_resenc"])
def test_planned_gflops_equal_flop_counter_with_the_shape_head(configuration):
    """The hybrid head's planned cost is what it adds to the real forward pass, and the total stays right."""
    plans = hand_plans(shape_head=False)
    nodes = [{"short_axis_mm": s, "long_axis_mm": 1.5 * s, "volume_mm3": s ** 3} for s in (6.0, 9.0, 14.0)]
    off = plans.configuration(configuration)
    on = planner.with_shape_head(off, planner.plan_shape_features({"nodes": nodes}))
    counted = {}
    for name, config in (("off", off), ("on", on)):
        batch = {"shape_features": torch.tensor([[8.0, 12.0, 500.0, 0.9]])}
        for s in config.scales:
            shape = plans.scales[s].roi_shape
            batch[f"image_{s}"], batch[f"mask_{s}"] = torch.randn(1, 1, *shape), torch.ones(1, 1, *shape)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network_for(plans, config).eval()(batch)
        counted[name] = counter.get_total_flops() / 1e9
    assert len(on.head_shape_features) == 4 and not off.head_shape_features
    assert on.estimated_gflops_per_sample == pytest.approx(counted["on"], rel=0.05)
    assert on.estimated_gflops_per_sample - off.estimated_gflops_per_sample == pytest.approx(
        counted["on"] - counted["off"], rel=1e-6)


def test_budget_counts_the_mask_channel():
    """The CPU budget is checked with image + mask channels: what the network really receives."""
    plans = hand_plans()
    for config in plans.configurations.values():
        if config.name in ("radiomics", "deep_radiomics"):     # no network trained
            continue
        assert config.use_mask_channel
        assert network_for(plans, config).in_channels == len(plans.normalization) + 1


def test_augmentation_and_tta_come_from_the_plans():
    plans = hand_plans()
    config = plans.configuration("2d25")
    assert plans.anisotropic and config.augmentation.inplane_only
    assert tta_flips(config) == [(), (3,), (4,), (3, 4)]          # in-plane flips of (B, C, S, R, Cc)
    config.augmentation.test_time_mirror_axes = (2,)
    assert tta_flips(config) == [(), (4,)]
    again = type(plans).from_dict(json.loads(json.dumps(plans.to_dict())))
    assert again.configuration("2d25").augmentation == config.augmentation


def test_inplane_only_augmentation_keeps_every_slice_from_its_own_slice():
    plans = hand_plans()
    config = plans.configuration("3d_resenc")
    config.augmentation.p_rotation = config.augmentation.p_scale = 1.0    # always rotate and scale
    scale = plans.scales["global"]
    n_slices = scale.cache_shape[0]
    # every slice holds a constant value of its own: any mixing between slices would show up
    values = np.arange(1, n_slices + 1, dtype=np.float32) * 10
    image = np.broadcast_to(values[:, None, None], scale.cache_shape).astype(np.float32)
    batch = {"image_global": np.stack([image[None]] * 4), "mask_global": np.ones((4, 1, *scale.cache_shape), np.float32)}
    out = augmentation(plans, config)(**batch)
    assert out["image_global"].shape == (4, 1, *scale.roi_shape)
    for b in range(4):
        for z in range(n_slices):
            # gamma/noise may change intensities, but only within the slice: the slice stays constant-ish and
            # far from its neighbours (10 apart)
            assert abs(float(np.median(out["image_global"][b, 0, z])) - values[z]) < 5


def test_slices_to_channels_round_trip():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 8, 6)).astype(np.float32)
    data = SlicesToChannels(("image_global",))(image_global=x.copy())
    assert data["image_global"].shape == (2, 15, 8, 6)
    back = ChannelsToSlices(("image_global",))(**data)
    assert np.array_equal(back["image_global"], x) and "image_global__channels" not in back


def test_registry_epoch_names():
    from lnm_auto.training.semi_supervised import LNMTrainerPGLS
    assert trainer_class("LNMTrainerPGLS_7epochs") == (LNMTrainerPGLS, 7)
    assert split_trainer_name("LNMTrainer") == ("LNMTrainer", None)
    assert trainer_name("LNMTrainer", 50, 50) == "LNMTrainer" and trainer_name("LNMTrainer", 5, 50) == "LNMTrainer_5epochs"
    with pytest.raises(LNMError, match="did you mean LNMTrainerPGLS"):
        trainer_class("LNMTrainerPGSL")


@pytest.mark.slow   # a fresh interpreter importing torch
def test_semi_supervised_module_imports_alone():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", "import lnm_auto.training.semi_supervised"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("text,expected", [("1", 1), ("1.0", 1), (" 1 ", 1), ("03", 3), ("12.000", 12)])
def test_node_ids_normalised_once(text, expected):
    assert parse_node_id(text) == expected


@pytest.mark.parametrize("bad", ["A", "", "0", "-1", "2.5", "1e3"])
def test_bad_node_id_is_one_line_naming_file_and_row(tmp_path, bad):
    path = tmp_path / "nodes.csv"
    path.write_text(f"case,node\nc1,1\nc1,{bad}\n")
    df = read_csv_text(path)
    with pytest.raises(LNMError) as e:
        node_ids(df["node"], path)
    assert str(path) in str(e.value) and "line 3" in str(e.value) and "\n" not in str(e.value)


def test_csv_reader_accepts_bom_crlf_and_spaces(tmp_path):
    path = tmp_path / "nodes.csv"
    path.write_bytes("\ufeffcase, node ,station\r\nc1, 1.0 , 7\r\n".encode("utf-8"))
    df = read_csv_text(path, "node table", ("case", "node", "station"))
    assert list(df.columns) == ["case", "node", "station"] and df.iloc[0].tolist() == ["c1", "1.0", "7"]
    assert node_ids(df["node"], path).tolist() == [1]


def test_one_json_writer_writes_nan_as_null(tmp_path):
    save_json({"a": float("nan"), "b": np.float32(0.5), "c": np.arange(2), "d": [math.inf]}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": 0.5, "c": [0, 1], "d": [None]}


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "format_version": 2, "payload": _RunsCode(str(marker))}, path,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(LNMError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_of_other_plans_or_format_is_refused(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint({"network_weights": {"w": torch.zeros(1)}, "plans_identifier": "aaaa"}, path)
    assert load_checkpoint(path, "aaaa")["network_weights"]["w"].shape == (1,)
    with pytest.raises(LNMError, match="other plans"):
        load_checkpoint(path, "bbbb")
    torch.save({"network_weights": {}, "format_version": 1}, path)
    with pytest.raises(LNMError, match="format 1"):
        load_checkpoint(path)


def test_positive_bag_never_loses_its_evidence():
    nodes = pd.DataFrame({"label": [-1] * 30 + [1], "station_label": [-1] * 31})
    rs = np.random.RandomState(0)
    for _ in range(50):
        kept = subsample_bag(list(range(31)), nodes, 1, rs)
        assert len(kept) == 12 and 30 in kept and len(set(kept)) == 12
    nodes = pd.DataFrame({"label": [-1] * 31, "station_label": [0] * 28 + [1] * 3})
    kept = subsample_bag(list(range(31)), nodes, 1, rs)
    assert {28, 29, 30} <= set(kept)


def test_random_bytes_are_not_a_checkpoint_rather_than_refused_code(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(LNMError, match="not a checkpoint"):
        load_checkpoint(path)


def test_2d_convolutions_are_channels_last_and_compute_the_same():
    """network_for puts 2D convolution weights in channels_last (faster on CPU): same outputs and gradients as the
    contiguous network, and its state dict loads into a fresh network and back."""
    plans = hand_plans()
    config = plans.configuration("2d25")
    torch.manual_seed(0)
    net = network_for(plans, config).train()
    load_imagenet_backbones(net)   # as training starts (a randomly initialised efficientnet is ill-conditioned)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    contiguous = network_for(plans, config).train()
    contiguous.load_state_dict(net.state_dict())
    for m in contiguous.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous()
    batch = {"shape_features": torch.tensor([[8.0, 12.0, 500.0, 0.9]] * 3)}
    for s in config.scales:
        shape = plans.scales[s].roi_shape
        batch[f"image_{s}"], batch[f"mask_{s}"] = torch.randn(3, 1, *shape), torch.ones(3, 1, *shape)
    outs = []
    for n in (net, contiguous):
        torch.manual_seed(1)    # the same dropout masks
        outs.append(n(batch)["fused"])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    outs[0].sum().backward(), outs[1].sum().backward()
    reference = next(m for m in contiguous.modules() if isinstance(m, torch.nn.Conv2d)).weight.grad
    # float32 summation order through the whole backward chain: 1e-4 of the largest gradient on two threads, 2.3e-3
    # on one (oneDNN picks other kernels); a layout bug would differ by the gradient's own size
    assert torch.allclose(convs[0].weight.grad, reference, atol=1e-2 * reference.abs().max())
    fresh = network_for(plans, config)
    fresh.load_state_dict(contiguous.state_dict())     # a checkpoint of either layout loads, values exact
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), contiguous.state_dict().values()))
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in fresh.modules() if isinstance(m, torch.nn.Conv2d))
