"""The command line end to end on tiny volumes, and its one-line errors."""

import argparse
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from medseg.cli import main
from medseg.io import read_volume
from tests.conftest import TINY_OVERRIDES, run_cli
from tests.test_metrics import _write


def _set(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def test_train_predict_evaluate(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_dataset), "--output", str(run), *_set(TINY_OVERRIDES)]) == 0
    assert "best validation Dice" in capsys.readouterr().out
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()

    preds = tmp_path / "preds"
    args = [
        "predict",
        "--model",
        str(run / "best.pt"),
        "--input",
        str(tiny_dataset / "imagesTs"),
        "--output",
        str(preds),
    ]
    assert main([*args, "--device", "cpu"]) == 0
    assert "2 written, 0 skipped" in capsys.readouterr().out
    for name in ("heart_003.nii.gz", "heart_004.nii.gz"):
        mask, image = read_volume(preds / name), read_volume(tiny_dataset / "imagesTs" / name)
        assert mask.GetSize() == image.GetSize()
        assert np.allclose(mask.GetDirection(), image.GetDirection())
    assert main(args) == 0  # again: nothing overwritten
    assert "0 written, 2 skipped" in capsys.readouterr().out

    evaluate = ["evaluate", "--pred", str(preds), "--ref", str(tiny_dataset / "labelsTs")]
    assert main([*evaluate, "--out", str(tmp_path / "scores")]) == 0
    out = capsys.readouterr().out
    assert "mean foreground Dice" in out and "surface Dice" in out
    # Class names come from the labels.json that predict wrote beside the masks.
    rows = list(csv.DictReader((tmp_path / "scores" / "metrics.csv").open()))
    assert [r["class"] for r in rows] == ["LV", "myocardium", "RV"] * 2
    (preds / "labels.json").unlink()
    names = tmp_path / "names.json"
    names.write_text('{"labels": {"0": "bg", "1": "pool", "2": "wall", "3": "right"}}')
    assert main([*evaluate, "--labels", str(names), "--tolerance", "1", "--tolerance", "wall=3"]) == 0
    summary = json.loads((preds / "summary.json").read_text())
    assert list(summary["classes"]) == ["pool", "wall", "right"]
    assert [summary["classes"][n]["tolerance_mm"] for n in ("pool", "wall", "right")] == [1, 3, 1]


def _assert_one_line_error(proc, *fragments, code=2):
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_dataset_is_one_line(tmp_path):
    proc = run_cli("train", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "run"))
    _assert_one_line_error(proc, str(tmp_path / "nowhere"), "no such dataset folder")


def test_unknown_config_key_is_one_line(tiny_dataset, tmp_path):
    proc = run_cli(
        "train", "--data", str(tiny_dataset), "--output", str(tmp_path / "r"), "--set", "train.epoch=3"
    )
    _assert_one_line_error(proc, "train.epoch", "did you mean 'epochs'")


def test_bad_inputs_to_predict_are_one_line(tiny_run, tmp_path):
    model = tiny_run["best"]
    proc = run_cli(
        "predict", "--model", model, "--input", str(tmp_path / "gone.nii.gz"), "--output", str(tmp_path / "o")
    )
    _assert_one_line_error(proc, "gone.nii.gz", "no such file")

    truncated = tmp_path / "cut.nii.gz"
    whole = tmp_path / "whole.nii.gz"
    sitk.WriteImage(_volume(), str(whole))
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    proc = run_cli("predict", "--model", model, "--input", str(truncated), "--output", str(tmp_path / "o"))
    _assert_one_line_error(proc, "cut.nii.gz", "truncated", code=1)  # a case failed: exit 1

    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(24, 24, sitk.sitkInt16), str(flat))
    proc = run_cli("predict", "--model", model, "--input", str(flat), "--output", str(tmp_path / "o"))
    _assert_one_line_error(proc, "slice.nii.gz", "is 2D (24x24); this model needs 3D images", code=1)

    proc = run_cli(
        "predict", "--model", str(tmp_path / "none.pt"), "--input", str(flat), "--output", str(tmp_path / "o")
    )
    _assert_one_line_error(proc, "none.pt", "no such checkpoint")


def _volume():
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 900, (12, 40, 40)).astype(np.int16))
    image.SetSpacing((4.4, 4.4, 10.0))
    return image


@pytest.mark.parametrize("command", ["demo", "train", "predict", "evaluate", "listen", "export"])
def test_help(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0
    assert "usage: medseg " + command in proc.stdout


def test_every_subcommand_runs_its_command():
    from medseg.cli import COMMANDS
    from medseg.cli_parser import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == set(COMMANDS)


def test_train_lists_every_bad_case_before_starting(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    (root / "labelsTr" / "heart_001.nii.gz").write_bytes(b"")
    label = sitk.ReadImage(str(root / "labelsTr" / "heart_002.nii.gz"))
    sitk.WriteImage(label[:, :, :-1], str(root / "labelsTr" / "heart_002.nii.gz"))
    proc = run_cli("train", "--data", str(root), "--output", str(tmp_path / "run"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: {root / 'labelsTr' / 'heart_001.nii.gz'}: file is empty",
        f"error: {root / 'labelsTr' / 'heart_002.nii.gz'}: "
        f"size (40, 40, 11) differs from the size (40, 40, 12) of its image "
        f"{root / 'imagesTr' / 'heart_002.nii.gz'}",
        f"error: {root}: 2 training case(s) cannot be used (listed above)",
    ]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_plan_prints_and_saves(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--data", str(tiny_dataset), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target spacing    4.4 x 4.4 x 10 mm (R, A, S)" in printed
    assert "pooling per level 2x2x2, 2x2x1, 1x1x1 (after a stem of 2x2x1)" in printed
    assert out.is_file()
    assert main(["plan", "--data", str(tiny_dataset), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_negative_epochs_end_with_one_line(tiny_dataset, tmp_path):
    proc = run_cli(
        "train", "--data", str(tiny_dataset), "--output", str(tmp_path / "r"), "--set", "train.epochs=-3"
    )
    _assert_one_line_error(proc, "'train.epochs' must be more than 0, got -3")
    assert not (tmp_path / "r").exists()


def test_evaluate_names_each_bad_case_and_prints_its_policy(tmp_path):
    lv = np.zeros((6, 6, 6))
    lv[1:4, 1:4, 1:4] = 1
    _write(tmp_path / "pred" / "both_empty.nii.gz", lv * 0)
    _write(tmp_path / "ref" / "both_empty.nii.gz", lv * 0)
    _write(tmp_path / "pred" / "one_empty.nii.gz", lv * 0)
    _write(tmp_path / "ref" / "one_empty.nii.gz", lv)
    _write(tmp_path / "ref" / "missing.nii.gz", lv)
    _write(tmp_path / "pred" / "other_grid.nii.gz", lv, spacing=(2.0, 1.0, 1.0))
    _write(tmp_path / "ref" / "other_grid.nii.gz", lv)
    _write(tmp_path / "pred" / "unreadable.nii.gz", lv)
    (tmp_path / "ref" / "unreadable.nii.gz").write_bytes(b"not a volume")
    proc = run_cli("evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "-q")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr  # one line per case that could not be scored
    assert lines[0].startswith("scored 0: other_grid: ") and "spacing" in lines[0]
    assert lines[1].startswith("not scored: unreadable: ") and "unreadable.nii.gz" in lines[1]
    assert "no prediction (scored 0): missing" in proc.stdout
    # both_empty 1, one_empty 0, missing 0, other_grid 0: the unreadable reference is left out
    assert "mean foreground Dice: 0.250 over 4 cases" in proc.stdout
    assert "scored as failures (Dice 0, worst-case distance): class_1 3" in proc.stdout
    assert "policy: both empty: Dice 1" in proc.stdout


def test_a_crash_has_its_own_exit_code(monkeypatch, tmp_path, capsys):
    from medseg.evaluation import folders

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(folders, "evaluate", broken)
    assert main(["evaluate", "--pred", str(tmp_path), "--ref", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "medseg crashed: RuntimeError: a bug" in err


def test_train_flags_stand_for_settings_and_predict_picks_the_checkpoint(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--device", "cpu", "--max-time", "60", "--seed", "1", "--epochs", "1", "--threads", "1"]
    assert main(["train", "-d", str(tiny_dataset), "-o", str(run), *_set(TINY_OVERRIDES), *flags]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["device"], saved["train"]["max_time"], saved["train"]["seed"]) == ("cpu", 60.0, 1)
    out = tmp_path / "preds"
    args = ["predict", "-m", str(run), "--checkpoint", "last", "--overlap", "0.5", "--device", "cpu"]
    assert main([*args, "-i", str(tiny_dataset / "imagesTs"), "-o", str(out)]) == 0
    report = json.loads((out / "run.json").read_text())
    assert report["checkpoint"].endswith("last.pt")
    assert report["identity"]["options"]["overlap"] == 0.5
    capsys.readouterr()
    assert main([*args[:-4], "--overlap", "1.5", "-i", str(tiny_dataset / "imagesTs"), "-o", str(out)]) == 2
    assert "'infer.overlap' must be at least 0 and below 1" in capsys.readouterr().err


def test_a_cross_validation_folder_predicts_with_the_folds_asked(tiny_run, tmp_path):
    import shutil
    from pathlib import Path

    from medseg.errors import CheckpointError
    from medseg.inference.predictor import Predictor

    for k in (0, 1, 2):
        shutil.copytree(Path(tiny_run["best"]).parent, tmp_path / "cv" / f"fold_{k}")
    assert len(Predictor(tmp_path / "cv", device="cpu").members) == 3
    chosen = Predictor(tmp_path / "cv", device="cpu", folds=[0, 2], which="last")
    assert [Path(p).parent.name for p in chosen.checkpoints] == ["fold_0", "fold_2"]
    assert all(p.endswith("last.pt") for p in chosen.checkpoints)
    with pytest.raises(CheckpointError, match="has no fold 5"):
        Predictor(tmp_path / "cv", device="cpu", folds=[5])


def test_a_scan_given_as_a_model_says_what_a_checkpoint_is(tiny_dataset, tmp_path):
    scan = next((tiny_dataset / "imagesTs").iterdir())
    done = run_cli("predict", "-m", str(scan), "-i", str(scan), "-o", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "is not a medseg checkpoint (the best.pt or last.pt that medseg train writes" in done.stderr
    assert "Traceback" not in done.stderr


def test_predict_help_lists_every_exit_code(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0 all cases", "1 some cases failed", "2 usage", "3 a crash", "130 interrupted"):
        assert code in text


def test_plan_says_which_device_it_planned_for(tiny_dataset, capsys):
    assert main(["plan", "--data", str(tiny_dataset), "--device", "cpu", "--modality", "MRI"]) == 0
    assert "planned for training on cpu in" in capsys.readouterr().out


def test_a_dataset_json_names_every_missing_file(tiny_dataset, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    meta = json.loads((data / "dataset.json").read_text())
    gone = [data / meta["training"][0]["image"], data / meta["training"][1]["label"]]
    for path in gone:
        path.unlink()
    assert main(["plan", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    for path in gone:
        assert f"{path.resolve()}: listed in dataset.json but missing" in err
    assert "lists 2 files that are missing" in err


def test_the_demo_refuses_a_folder_that_is_not_its_own(tmp_path):
    from medseg.demo import run_demo
    from medseg.errors import InputError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "predictions").mkdir()
    (tmp_path / "mine" / "predictions" / "precious.nii.gz").write_bytes(b"keep me")
    with pytest.raises(InputError, match="holds files that are not the demo's"):
        run_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "predictions" / "precious.nii.gz").read_bytes() == b"keep me"


def test_a_run_resumes_from_another_working_directory(tiny_dataset, tmp_path, monkeypatch):
    from medseg.config import load_config
    from medseg.training.trainer import Trainer

    monkeypatch.chdir(tiny_dataset.parent)
    run = tmp_path / "run"
    config = load_config(None, [*TINY_OVERRIDES, f"data.root={tiny_dataset.name}", f"train.output_dir={run}"])
    Trainer(config).fit()
    saved = load_config(run / "config.yaml")
    assert saved.data.root == str(tiny_dataset.resolve())
    monkeypatch.chdir(tmp_path)
    resumed = Trainer.resume(run, ["train.epochs=2"])
    assert resumed.fit()["epochs"] == 2
