"""medseg export: a model folder whose masks are the checkpoint's, run by OpenVINO or ONNX
Runtime; its refusals; the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.config import load_config
from medseg.errors import CheckpointError, ConfigError, InputError
from medseg.inference.export import export_model
from medseg.inference.model_folder import INT8_FILES, MODEL_FILE, NETWORK_FILE
from medseg.inference.predictor import Predictor
from medseg.inference.quantize import check_quantizer
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


def test_the_model_folder_carries_the_checkpoints_tta_decision(learned_run, tmp_path):
    payload = torch.load(learned_run[1]["best"], weights_only=True)
    payload["config"]["augment"].update(flip_prob=0.5, flip_axes=[1, 2])  # as if trained mirrored
    for gain, passes in ((0.0005, 1), (0.01, 4)):  # what training measured TTA to add
        payload["tta_gain"] = gain
        torch.save(payload, tmp_path / f"weighed_{passes}.pt")
        folder = export_model(tmp_path / f"weighed_{passes}.pt", tmp_path / f"model_{passes}").parent
        assert json.loads((folder / MODEL_FILE).read_text())["tta_gain"] == gain
        assert Predictor(folder, device="cpu").passes == passes


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
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ConfigError, match=r"--int8: needs NNCF and OpenVINO: pip install \"medseg\[int8\]\""):
        check_quantizer()


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


def test_openmp_threads_sleep_while_an_exported_network_runs(exported, tmp_path):
    # libgomp reads OMP_WAIT_POLICY when torch loads it: predict must set it before any import
    # of torch, and only for an exported model (torch's own network is slower with it).
    checkpoint, folder = exported
    image, _ = learned_phantom(503)
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    code = (
        "import os, sys; import medseg.cli as cli; assert 'torch' not in sys.modules; "
        "rc = cli.main(['predict', '-m', sys.argv[1], '-i', sys.argv[2], '-o', sys.argv[3], '-q']); "
        "print(rc, os.environ.get('OMP_WAIT_POLICY'))"
    )
    seen = {}
    for model, out in ((folder, "a"), (checkpoint, "b")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        argv = [sys.executable, "-c", code, str(model), str(tmp_path / "scan.nii.gz"), str(tmp_path / out)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        seen[out] = proc.stdout.split()[-2:]
    assert seen == {"a": ["0", "PASSIVE"], "b": ["0", "None"]}


def test_a_python_caller_is_told_to_let_openmp_threads_sleep(exported, monkeypatch, caplog):
    from medseg.inference.runtime import RuntimeNetwork

    _, folder = exported
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with caplog.at_level("INFO", logger="medseg.inference.runtime"):
        RuntimeNetwork(folder / NETWORK_FILE).prepare(None)
    assert "set OMP_WAIT_POLICY=PASSIVE before importing torch" in caplog.text
    caplog.clear()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with caplog.at_level("INFO", logger="medseg.inference.runtime"):
        RuntimeNetwork(folder / NETWORK_FILE).prepare(None)
    assert "OMP_WAIT_POLICY" not in caplog.text


needs_int8 = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("nncf", "openvino")),
    reason="int8 needs NNCF and OpenVINO: pip install medseg[int8]",
)


@pytest.fixture(scope="module")
def int8_model(learned_run, tmp_path_factory):
    root, summary = learned_run  # trained without a validation split: its dataset validates
    folder = tmp_path_factory.mktemp("int8") / "model"
    export_model(summary["best"], folder, int8=True, validate=root)
    return summary["best"], folder


@needs_int8
def test_int8_keeps_the_masks_and_says_how_it_was_checked(int8_model):
    checkpoint, folder = int8_model
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_FILE, *sorted(INT8_FILES)]
    description = json.loads((folder / MODEL_FILE).read_text())
    guard = description["int8"]
    assert description["precision"] == "int8" and description["network"] == "network.xml"
    # A phantom fits one window: one window per training image
    assert guard["calibration"] == {"from": "the run's training images", "images": 4, "windows": 4}
    assert guard["validation"]["cases"] == 6 and guard["dice_fp32"] > 0.9
    assert guard["dice_int8"] >= guard["dice_fp32"] - 0.005
    deployed = Predictor(folder, device="cpu")
    assert deployed.options["precision"].startswith("int8+")
    ours = Predictor(checkpoint, device="cpu", precision="fp32")
    image, label = learned_phantom(503, "lps")
    mask, reference = deployed.predict(image), ours.predict(image)
    assert np.mean(mask == reference) > 0.99 and mean_dice(mask, label) > 0.85


@needs_int8
def test_int8_is_refused_when_dice_falls_and_nothing_is_written(learned_run, tmp_path):
    root, summary = learned_run
    with pytest.raises(
        ConfigError, match=r"int8's mean Dice 0\.\d+ is -?0\.\d+ below fp32's .* nothing written"
    ):
        export_model(summary["best"], tmp_path / "model", int8=True, validate=root, max_dice_drop=-1.0)
    assert list((tmp_path / "model").iterdir()) == []  # nor the staging folder


@needs_int8
def test_int8_needs_cases_and_runs_in_openvino_only(int8_model, learned_run, tmp_path):
    checkpoint, folder = int8_model
    with pytest.raises(ConfigError, match="int8 needs labelled cases to check Dice on"):
        export_model(checkpoint, tmp_path / "a", int8=True)  # the run has no validation split
    alone = tmp_path / "alone.pt"
    alone.write_bytes(Path(checkpoint).read_bytes())  # no run folder beside it
    with pytest.raises(ConfigError, match="int8 needs images to calibrate on"):
        export_model(alone, tmp_path / "b", int8=True)
    with pytest.raises(ConfigError, match="go with --int8"):
        export_model(checkpoint, tmp_path / "c", calibrate=learned_run[0])
    with pytest.raises(ConfigError, match="runs in OpenVINO, not ONNX Runtime"):
        Predictor(folder, runtime="onnxruntime")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    weights = copy / INT8_FILES[1]
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="network.bin: differs from the network exported"):
        Predictor(copy)


@needs_int8
def test_cli_int8_export_calibrates_on_a_folder_and_reports_the_guard(learned_run, tmp_path):
    root, summary = learned_run
    run = Path(summary["best"]).parent
    args = ["--int8", "--calibrate", str(root / "imagesTs"), "--validate", str(root)]
    proc = run_cli("export", "-m", str(run), "-o", str(tmp_path / "model"), *args)
    assert proc.returncode == 0, proc.stderr
    assert re.search(
        r"int8: mean Dice 0\.\d{4} against fp32's 0\.\d{4} on 6 validation case\(s\)", proc.stdout
    )
    guard = json.loads((tmp_path / "model" / MODEL_FILE).read_text())["int8"]
    assert guard["calibration"]["from"] == str(root / "imagesTs") and guard["calibration"]["images"] == 2
