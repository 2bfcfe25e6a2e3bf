"""medseg export: a model folder whose masks are the checkpoint's, run by OpenVINO or ONNX
Runtime; its refusals; the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.config import load_config
from medseg.errors import CheckpointError, ConfigError, InputError
from medseg.inference.export import MODEL_FILE, NETWORK_FILE, export_model
from medseg.inference.predictor import Predictor
from medseg.inference.runtime import available_runtime
from medseg.training.trainer import Trainer
from tests.conftest import TINY_OVERRIDES, learned_phantom, mean_dice, run_cli

pytest.importorskip("onnxscript", reason="the exporter: pip install medseg[export]")
RUNTIMES = []  # each installed runtime, the others skipped
for _name in ("openvino", "onnxruntime"):
    try:
        __import__(_name)
        RUNTIMES.append(_name)
    except ImportError:
        RUNTIMES.append(pytest.param(_name, marks=pytest.mark.skip(reason=f"{_name} is not installed")))


@pytest.fixture(scope="module")
def exported(learned_run, tmp_path_factory):
    _, summary = learned_run
    folder = tmp_path_factory.mktemp("exported") / "model"
    export_model(summary["best"], folder)
    return summary["best"], folder


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_exported_model_gives_the_checkpoints_masks(exported, runtime):
    checkpoint, folder = exported
    ours = Predictor(checkpoint, device="cpu", precision="fp32")
    deployed = Predictor(folder, device="cpu", precision="fp32", runtime=runtime)
    assert deployed.options == ours.options
    for seed in (500, 501):
        image, label = learned_phantom(seed, "oblique")
        mask = deployed.predict(image)
        np.testing.assert_array_equal(mask, ours.predict(image))
        assert mean_dice(mask, label) > 0.8  # a real mask, not an empty one on both sides


def test_the_model_folder_says_what_it_holds(exported):
    checkpoint, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_FILE, NETWORK_FILE]
    description = json.loads((folder / MODEL_FILE).read_text())
    assert description["format"] == "medseg-export/1" and description["slice_axis"] is None
    assert description["exported_from"]["checkpoint"] == "best.pt"
    assert len(description["exported_from"]["sha256"]) == 64
    assert description["labels"] == {"0": "background", "1": "LV", "2": "myocardium", "3": "RV"}
    assert description["window"] == description["plan"]["patch_size"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_2d_network_on_slices_exports_and_predicts_the_same(tiny_dataset, tmp_path, runtime):
    config = load_config(None, [*TINY_OVERRIDES, "model.dims=2", "train.precision=fp32"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    best = Trainer(config).fit()["best"]
    export_model(best, tmp_path / "model")
    assert json.loads((tmp_path / "model" / MODEL_FILE).read_text())["slice_axis"] == 2
    image = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    ours = Predictor(best, device="cpu").predict(image)
    np.testing.assert_array_equal(Predictor(tmp_path / "model", runtime=runtime).predict(image), ours)


def test_export_keeps_what_is_there_and_a_changed_network_is_refused(exported, tmp_path):
    checkpoint, folder = exported
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        export_model(checkpoint, folder)
    copy = tmp_path / "copy"
    export_model(checkpoint, copy)
    (copy / NETWORK_FILE).write_bytes((copy / NETWORK_FILE).read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match="its SHA-256 changed"):
        Predictor(copy)
    (copy / NETWORK_FILE).unlink()
    with pytest.raises(CheckpointError, match="network.onnx: is missing"):
        Predictor(copy)
    (copy / MODEL_FILE).write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a medseg exported model"):
        Predictor(copy)


def test_a_missing_runtime_is_named_with_its_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"openvino or onnxruntime is not installed.*medseg\[deploy\]"):
        available_runtime("auto")
    with pytest.raises(ConfigError, match="must be auto, openvino, onnxruntime, not 'tensorrt'"):
        available_runtime("tensorrt")


def test_cli_export_then_predict_with_the_folder(exported, tmp_path):
    checkpoint, _ = exported
    run = Path(checkpoint).parent
    proc = run_cli("export", "-m", str(run), "-o", str(tmp_path / "model"))
    assert proc.returncode == 0, proc.stderr
    assert "medseg predict -m" in proc.stdout and proc.stderr == ""
    image, _ = learned_phantom(502)
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    args = ["-i", str(tmp_path / "scan.nii.gz"), "--precision", "fp32", "-q"]
    for model, out in ((tmp_path / "model", "a"), (checkpoint, "b")):
        proc = run_cli("predict", "-m", str(model), "-o", str(tmp_path / out), *args)
        assert proc.returncode == 0, proc.stderr
    a, b = (sitk.ReadImage(str(tmp_path / o / "scan.nii.gz")) for o in "ab")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    proc = run_cli("export", "-m", str(run), "-o", str(tmp_path / "model"))
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
