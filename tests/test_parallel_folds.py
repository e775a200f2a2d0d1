"""Folds trained side by side (training/parallel_folds.py): the same files as one after the other, lines that say
which fold they come from, a fold's bad input one line naming the fold, and the classifier's feature cache filled
once."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from lnm_auto.training.parallel_folds import FoldJob, _FoldLines, folds_at_once, train_folds
from lnm_auto.utils.errors import LNMError


def test_folds_at_once_is_one_per_core_on_a_cpu_and_one_on_a_gpu():
    assert folds_at_once(2, 5, "cpu") == 2
    assert folds_at_once(16, 5, "cpu") == 5      # never more processes than folds
    assert folds_at_once(1, 5, "cpu") == 1
    assert folds_at_once(8, 5, "cuda") == 1


def test_fold_lines_prefix_every_line_even_when_written_in_pieces():
    out = io.StringIO()
    lines = _FoldLines(out, "[2d25 fold 3] ")
    lines.write("epoch 1/3: ")
    lines.write("loss 0.5\nepoch 2/3\n")
    lines.write("done\n")
    assert out.getvalue() == "[2d25 fold 3] epoch 1/3: loss 0.5\n[2d25 fold 3] epoch 2/3\n[2d25 fold 3] done\n"
    assert not lines.isatty()


@pytest.mark.slow
def test_two_folds_at_once_train_both_folds_and_name_them(planned_tiny, tmp_path, capfd):
    root = planned_tiny(8)
    jobs = [FoldJob(42, "2d25", fold, ("LNMTrainer",), root / "pre", tmp_path / "results", num_epochs=1)
            for fold in (0, 1)]
    folders = train_folds(jobs, at_once=2)
    assert [Path(f).name for f in folders] == ["fold_0", "fold_1"]
    for f in folders:
        assert (Path(f) / "checkpoint_final.pth").is_file()
        assert (Path(f) / "validation" / "predictions.csv").is_file()
    out = capfd.readouterr().out
    assert "[2d25 fold 0] " in out and "[2d25 fold 1] " in out
    # continuing a finished run trains nothing (the demo's rerun)
    again = train_folds(jobs, at_once=2)
    assert again == folders
    assert "training already finished" in capfd.readouterr().out


@pytest.mark.slow
def test_a_folds_bad_input_is_one_line_naming_the_fold(planned_tiny, tmp_path):
    root = planned_tiny(8)
    # two bad folds: the pool waits for running jobs, so a good one beside them would train for nothing
    jobs = [FoldJob(42, "2d25", 7, ("LNMTrainer",), root / "pre", tmp_path / "r", num_epochs=1),
            FoldJob(42, "2d25", 8, ("LNMTrainer",), root / "pre", tmp_path / "r", num_epochs=1)]
    with pytest.raises(LNMError, match=r"^2d25 fold 7: .*fold"):
        train_folds(jobs, at_once=2)


@pytest.mark.slow
def test_the_first_classifier_fold_fills_the_feature_cache_the_others_read(planned_tiny, tmp_path):
    root = planned_tiny(8)
    jobs = [FoldJob(42, "radiomics", fold, ("RadiomicsTrainer",), root / "pre", tmp_path / "results",
                    raw_root=root / "raw") for fold in (0, 1, 2)]
    cache = root / "pre" / "Dataset042_Tiny" / "LNMPlans_radiomics"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.csv")} if cache.is_dir() else {}
    folders = train_folds(jobs, at_once=2, first_alone=True)
    assert all((Path(f) / "radiomics_model.json").is_file() for f in folders)
    files = sorted(cache.glob("*.csv"))
    assert len(files) == 8     # one per training case
    # the folds trained in parallel only read: every cache file was written before the first fold ended
    first_done = (Path(folders[0]) / "radiomics_model.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= first_done for p in files if p.name not in before)
