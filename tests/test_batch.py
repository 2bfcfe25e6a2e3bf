"""Batch prediction as a hospital runs it: no data loss, no stale masks, a report per case."""

from __future__ import annotations

import csv
import hashlib
import json
import locale
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.data.phantom import make_phantom
from medseg.device import precision_name
from medseg.errors import InputError
from medseg.evaluation.folders import evaluate
from medseg.inference.batch import predict_many, process_shard
from medseg.inference.cases import discover, parse_shard
from medseg.inference.predictor import Predictor
from medseg.io import read_volume, to_array
from tests.conftest import TINY_SHAPE, TINY_SPACING, learned_phantom, mean_dice, run_cli, write_dicom_series


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor(tiny_run["best"], device="cpu")


def _scans(folder: Path, names, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        image, _ = make_phantom(seed + k, shape=TINY_SHAPE, spacing=TINY_SPACING)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(folder / name))
    return folder


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- never lose or mislabel data ---------------------------------------------------------------


def test_output_that_is_the_input_is_refused(predictor, tmp_path):
    scans = _scans(tmp_path / "scans", ["a.nii.gz"])
    before = (scans / "a.nii.gz").read_bytes()
    for output in (scans, scans / "masks"):
        with pytest.raises(InputError, match="is the input folder .* or inside it"):
            predict_many(predictor, scans, output, overwrite=True)
    with pytest.raises(InputError, match="is an input file; the output would replace it"):
        predict_many(predictor, scans / "a.nii.gz", scans, overwrite=True)
    assert (scans / "a.nii.gz").read_bytes() == before
    assert sorted(p.name for p in scans.iterdir()) == ["a.nii.gz"]  # nothing written there


def test_a_different_checkpoint_is_not_treated_as_done(predictor, tiny_dataset, tmp_path):
    from medseg.checkpoint import Checkpoint

    scans = _scans(tmp_path / "scans", ["a.nii.gz", "b.nii.gz"])
    out = tmp_path / "out"
    first = predict_many(predictor, scans, out)
    assert len(first.written) == 2

    # Same weights, nudged: another checkpoint file with another hash.
    checkpoint = Checkpoint.load(predictor.checkpoint)
    for value in checkpoint.weights.values():
        if value.is_floating_point():
            value.add_(0.01)
    other = Predictor(checkpoint.save(tmp_path / "other.pt"), device="cpu")
    assert other.sha256 != predictor.sha256
    with pytest.raises(InputError) as info:
        predict_many(other, scans, out)
    assert "2 mask(s) here were not made by this checkpoint with these options" in info.value.message
    assert (
        f"made by checkpoint {predictor.sha256[:12]}, this one is {other.sha256[:12]}" in info.value.message
    )
    assert "pass --overwrite" in info.value.message

    again = predict_many(other, scans, out, overwrite=True)
    assert len(again.written) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["checkpoint_sha256"] == other.sha256
    # And now the first model's masks are the strangers.
    with pytest.raises(InputError, match="not made by this checkpoint"):
        predict_many(predictor, scans, out)


def test_other_options_or_a_foreign_mask_are_not_done_either(predictor, tmp_path):
    scans = _scans(tmp_path / "scans", ["a.nii.gz"])
    out = tmp_path / "out"
    predict_many(predictor, scans, out)
    saved = predictor.config.infer.overlap
    predictor.config.infer.overlap = 0.5
    try:
        with pytest.raises(InputError, match=r"made with other options: overlap 0.25 -> 0.5"):
            predict_many(predictor, scans, out)
    finally:
        predictor.config.infer.overlap = saved
    # A mask computed in another precision, or on another kind of device, may differ in a few voxels
    saved = predictor.amp_dtype
    predictor.amp_dtype = torch.float16
    try:
        with pytest.raises(
            InputError, match=rf"made with other options: precision '{precision_name(saved)}' -> 'fp16'"
        ):
            predict_many(predictor, scans, out)
    finally:
        predictor.amp_dtype = saved
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["options"]["device"] == "cpu"
    (out / "run.json").unlink()  # a mask no report vouches for
    with pytest.raises(InputError, match="no run report here records it"):
        predict_many(predictor, scans, out)


def test_files_follow_the_umask(predictor, tmp_path):
    scans = _scans(tmp_path / "scans", ["a.nii.gz"])
    old = os.umask(0o027)
    try:
        predict_many(predictor, scans, tmp_path / "out", preview=True)
    finally:
        os.umask(old)
    for name in ("a.nii.gz", "predictions.csv", "run.json", "labels.json", "previews/a.nii.gz.png"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o640, name


def test_unwritable_output_is_one_line_and_exit_2(tiny_run, tmp_path):
    scans = _scans(tmp_path / "scans", ["a.nii.gz"])
    (tmp_path / "taken").write_text("a file")
    for output, problem in (
        (tmp_path / "taken", "is a file, not a folder"),
        (Path("/proc/medseg"), "cannot"),
    ):
        proc = run_cli("predict", "-m", tiny_run["best"], "-i", str(scans), "-o", str(output))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith(f"error: {output}: {problem}")
        assert "Traceback" not in proc.stderr


def test_killed_mid_batch_leaves_no_partial_mask_and_resumes(tiny_run, tmp_path):
    names = [f"case_{k:02d}.nii.gz" for k in range(24)]
    scans = _scans(tmp_path / "scans", names)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "medseg",
        "predict",
        "-m",
        tiny_run["best"],
        "-i",
        str(scans),
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("case_*.nii.gz")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    masks = sorted(out.glob("case_*.nii.gz"))
    assert 0 < len(masks) < len(names), "the kill must land mid-batch"
    for mask in masks:  # every visible mask is whole
        assert to_array(read_volume(mask)).shape == TINY_SHAPE
    report = json.loads((out / "run.json").read_text())  # and the report is valid JSON
    recorded = {r["output"] for r in _rows(out / "predictions.csv") if r["status"] == "written"}
    # The CSV row goes first, then run.json: a kill between the two leaves one more row.
    assert report["counts"]["written"] in (len(recorded), len(recorded) - 1) and report["finished"] is None
    assert recorded <= {m.name for m in masks}
    assert {m.name for m in masks} <= recorded | set(report["in_progress"])

    proc = run_cli("predict", "-m", tiny_run["best"], "-i", str(scans), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out / "predictions.csv")
    skipped = {r["output"] for r in rows if r["status"] == "skipped"}
    assert skipped == recorded  # only what was missing (or half-done) was redone
    assert len(rows) == len(names) and {r["status"] for r in rows} <= {"written", "skipped"}
    assert sum(r["status"] == "written" for r in rows) == len(names) - len(recorded)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*names, "labels.json", "predictions.csv", "run.json"]
    )
    assert not list(out.glob(".medseg-tmp-*"))  # the killed run's temp folder was cleared


# --- the report ---------------------------------------------------------------------------------


def test_report_has_volumes_statistics_and_provenance(learned_run, tmp_path):
    predictor = Predictor(learned_run[1]["best"], device="cpu")
    scans = tmp_path / "scans"
    scans.mkdir()
    image, label = learned_phantom(8)
    sitk.WriteImage(image, str(scans / "a.nii.gz"))
    (scans / "broken.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    result = predict_many(predictor, scans, out, statistics=True)
    rows = {r["input"]: r for r in _rows(out / "predictions.csv")}
    assert list(next(iter(rows.values())))[:5] == ["input", "output", "status", "reason", "seconds"]
    row = rows[str(scans / "a.nii.gz")]
    assert row["status"] == "written" and row["output"] == "a.nii.gz"
    mask = to_array(read_volume(out / "a.nii.gz"))
    truth = to_array(label)
    voxel_ml = np.prod(image.GetSpacing()) / 1000
    values = to_array(image).astype(float)
    for index, name in predictor.labels.items():
        if index == 0:
            continue
        assert float(row[f"{name}_ml"]) == pytest.approx((mask == index).sum() * voxel_ml, abs=1e-3)
        # and close to the true structure's volume: the mask is not empty or another label's
        assert float(row[f"{name}_ml"]) == pytest.approx((truth == index).sum() * voxel_ml, rel=0.3)
        assert float(row[f"{name}_mean"]) == pytest.approx(values[mask == index].mean(), rel=1e-4)
    assert rows[str(scans / "broken.nii.gz")]["status"] == "failed"
    assert rows[str(scans / "broken.nii.gz")]["reason"] == "file is empty"

    run = json.loads((out / "run.json").read_text())
    digest = hashlib.sha256(Path(predictor.checkpoint).read_bytes()).hexdigest()
    assert run["identity"] == {
        "checkpoint_sha256": digest,
        "options": {
            "format": "same",
            "overlap": 0.25,
            "patch_size": predictor.options["patch_size"],
            "tta_axes": None,
            "keep_largest": [],
            "precision": precision_name(predictor.amp_dtype),
            "device": "cpu",
            "probabilities": False,
            "uncertainty": False,
        },
    }
    assert run["medseg_version"] and run["finished"]
    assert run["counts"] == {"written": 1, "skipped": 0, "failed": 1, "pending": 0}
    assert run["failed"] == [{"input": str(scans / "broken.nii.gz"), "reason": "file is empty"}]
    assert result.report == out / "predictions.csv"


# --- inputs -------------------------------------------------------------------------------------


def test_sub_folders_are_searched_and_mirrored(predictor, tmp_path):
    scans = _scans(tmp_path / "scans", ["p1/scan.nii.gz", "p2/scan.nii.gz", "p2/deep/x.nrrd"])
    result = predict_many(predictor, scans, tmp_path / "out")
    assert sorted(Path(p).relative_to(tmp_path / "out").as_posix() for p in result.written) == [
        "p1/scan.nii.gz",
        "p2/deep/x.nrrd",
        "p2/scan.nii.gz",
    ]


def test_nnunet_channel_suffix_is_dropped_so_evaluate_pairs_them(predictor, tiny_dataset, tmp_path):
    images = tmp_path / "imagesTs"
    images.mkdir()
    for path in sorted((tiny_dataset / "imagesTs").glob("*.nii.gz")):
        (images / path.name.replace(".nii.gz", "_0000.nii.gz")).write_bytes(path.read_bytes())
    result = predict_many(predictor, images, tmp_path / "out")
    assert sorted(Path(p).name for p in result.written) == ["heart_003.nii.gz", "heart_004.nii.gz"]
    scores = evaluate(tmp_path / "out", tiny_dataset / "labelsTs", out=tmp_path / "scores")
    assert [c["id"] for c in scores["cases"]] == ["heart_003", "heart_004"]
    assert scores["missing_predictions"] == []


def test_lists_of_files(predictor, tmp_path):
    scans = _scans(tmp_path / "scans", ["a.nii.gz", "sub/b.nii.gz"])
    (tmp_path / "list.txt").write_text(
        "# tonight's scans\nscans/a.nii.gz\n\nscans/sub/b.nii.gz\nscans/gone.nii.gz\n"
    )
    result = predict_many(predictor, tmp_path / "list.txt", tmp_path / "out")
    assert sorted(Path(p).name for p in result.written) == ["a.nii.gz", "b.nii.gz"]
    assert result.failed == {str(scans / "gone.nii.gz"): "listed in list.txt but missing"}

    (tmp_path / "list.csv").write_text("id,image\npatient-7/../../x,scans/a.nii.gz\n")
    result = predict_many(predictor, tmp_path / "list.csv", tmp_path / "out_csv")
    assert result.written == [str(tmp_path / "out_csv" / "patient-7_.._.._x.nii.gz")]  # never a path


def test_two_inputs_for_one_mask_are_refused(predictor, tmp_path):
    scans = _scans(tmp_path / "scans", ["a.nii.gz", "a_0000.nii.gz"])
    with pytest.raises(InputError, match="would write the same file a.nii.gz"):
        predict_many(predictor, scans, tmp_path / "out")


def test_nan_volumes(predictor, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    image, _ = make_phantom(1, shape=TINY_SHAPE, spacing=TINY_SPACING)
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    nan = sitk.GetImageFromArray(np.full_like(values, np.nan))
    nan.CopyInformation(image)
    sitk.WriteImage(nan, str(scans / "all_nan.nii.gz"))
    values[:, :4, :] = np.nan
    partly = sitk.GetImageFromArray(values)
    partly.CopyInformation(image)
    sitk.WriteImage(partly, str(scans / "some_nan.nii.gz"))
    flat = sitk.GetImageFromArray(np.full_like(values, 7.0))
    flat.CopyInformation(image)
    sitk.WriteImage(flat, str(scans / "flat.nii.gz"))

    result = predict_many(predictor, scans, tmp_path / "out")
    assert result.failed == {
        str(scans / "all_nan.nii.gz"): "every voxel is NaN or infinite; nothing to segment"
    }
    assert sorted(Path(p).name for p in result.written) == ["flat.nii.gz", "some_nan.nii.gz"]
    reasons = {r["output"]: r["reason"] for r in result.records}
    assert reasons["some_nan.nii.gz"] == "10.0 % of voxels are NaN or infinite (read as the lowest value, 0)"
    assert reasons["flat.nii.gz"] == "every voxel is 7: the mask will be empty or meaningless"


def test_dicom_seg_for_a_nifti_is_refused_before_inference(predictor, tmp_path, monkeypatch):
    pytest.importorskip("highdicom")
    scans = _scans(tmp_path / "scans", ["a.nii.gz"])
    calls = []
    monkeypatch.setattr(predictor, "load", lambda source: calls.append(source))
    result = predict_many(predictor, scans, tmp_path / "out", fmt="dicom-seg")
    assert result.failed == {str(scans / "a.nii.gz"): "DICOM-SEG output needs a DICOM series as input"}
    assert calls == []


def _odd_dicom_folder(root: Path) -> dict:
    """Good series (plain, JPEG-lossless, big-endian) among files that break DICOM readers."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

    image, label = learned_phantom(4, "lps")
    plain = write_dicom_series(image, root / "plain", uid="1.2.826.0.1.1", description="plain")
    slices = sorted(plain.iterdir())

    jpeg = root / "jpeg"
    jpeg.mkdir()
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer switches it to "C"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")  # GDCM writes JPEG lossless for 16-bit pixels
    for k, path in enumerate(slices):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        piece = reader.Execute()
        for key in reader.GetMetaDataKeys():
            piece.SetMetaData(key, reader.GetMetaData(key))
        piece.SetMetaData("0020|000e", "1.2.826.0.1.2")
        piece.SetMetaData("0008|103e", "jpeg")
        piece.SetMetaData("0008|0018", f"1.2.826.0.1.2.{k + 1}")
        writer.SetFileName(str(jpeg / path.name))
        writer.Execute(piece)
    locale.setlocale(locale.LC_ALL, saved_locale)

    big = root / "big_endian"
    big.mkdir()
    for k, path in enumerate(slices):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        ds.SeriesInstanceUID, ds.SeriesDescription = "1.2.826.0.1.3", "big"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3.{k + 1}"
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
        ds["PixelData"].VR = "OW"
        dcmwrite(big / path.name, ds, little_endian=False, implicit_vr=False, force_encoding=True)

    odd = root / "odd"
    odd.mkdir()
    (odd / "truncated.dcm").write_bytes(slices[0].read_bytes()[:300])
    (odd / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 400)
    raw = bytearray(slices[1].read_bytes())
    at = raw.find(b"\x08\x00\x60\x00")  # (0008,0060) Modality: give it a VR that does not exist
    raw[at + 4 : at + 6] = b"ZZ"
    (odd / "bad_vr.dcm").write_bytes(bytes(raw))
    (odd / "notes.txt").write_text("not DICOM, not an image: ignored")
    for name, sop, modality in (
        ("sr.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR"),
        ("rt.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT"),
    ):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, meta.MediaStorageSOPInstanceUID, modality
        ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), "1.2.826.0.1.1.0"
        ds.save_as(odd / name, enforce_file_format=True)
    return {"image": image, "label": label}


def test_odd_dicom_files_are_named_and_good_series_still_written(learned_run, tmp_path):
    made = _odd_dicom_folder(tmp_path / "dicom")
    out = tmp_path / "out"
    proc = run_cli("predict", "-m", learned_run[1]["best"], "-i", str(tmp_path / "dicom"), "-o", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    odd = tmp_path / "dicom" / "odd"
    for name in ("truncated.dcm", "garbage.dcm", "bad_vr.dcm"):
        assert f"error: {odd / name}: not a readable DICOM" in proc.stderr
    assert "notes.txt" not in proc.stderr + proc.stdout
    rows = {r["input"]: r for r in _rows(out / "predictions.csv")}
    assert rows[str(odd / "sr.dcm")]["status"] == "skipped"
    assert rows[str(odd / "rt.dcm")]["reason"] == "DICOM RTSTRUCT without an image to segment"
    written = sorted(r["output"] for r in rows.values() if r["status"] == "written")
    assert written == [
        "big_endian/big_.2.826.0.1.3.nii.gz",
        "jpeg/jpeg_.2.826.0.1.2.nii.gz",
        "plain/plain_.2.826.0.1.1.nii.gz",
    ]
    masks = [to_array(read_volume(out / name)) for name in written]
    for mask in masks:
        assert mask.shape == made["image"].GetSize()
        assert mean_dice(mask, to_array(made["label"])) > 0.7  # decoded right, slices in order
    # The same pixels however they were encoded: the same mask.
    np.testing.assert_array_equal(masks[0], masks[2])
    np.testing.assert_array_equal(masks[1], masks[2])
    assert "3 written, 2 skipped, 3 failed" in proc.stdout


# --- scale-out ----------------------------------------------------------------------------------


def test_shards_cover_every_case_once(predictor, tmp_path):
    scans = _scans(tmp_path / "scans", [f"s{k}.nii.gz" for k in range(5)])
    out = tmp_path / "out"
    first = predict_many(predictor, scans, out, shard=(0, 2))
    second = predict_many(predictor, scans, out, shard=(1, 2))
    assert sorted(first.written + second.written) == sorted(str(out / f"s{k}.nii.gz") for k in range(5))
    assert not set(first.written) & set(second.written)
    assert (out / "predictions.shard-0-of-2.csv").is_file() and (out / "run.shard-1-of-2.json").is_file()
    again = predict_many(predictor, scans, out)  # unsharded: both shards' reports vouch for the masks
    assert len(again.skipped) == 5 and again.written == []


def test_torchrun_ranks_split_the_shard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert process_shard(None) == (3, 4)
    assert process_shard((1, 2)) == (7, 8)  # job 1 of 2, rank 3 of 4
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert process_shard((1, 2)) == (1, 2)
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "-1/3", "a/b"):
        with pytest.raises(Exception, match="is not i/n"):
            parse_shard(bad)


def test_discovery_is_sorted_and_sharding_stable(tmp_path):
    scans = _scans(tmp_path / "scans", ["b.nii.gz", "a/x.nii.gz", "c.mha"])
    assert [c.mask for c in discover(scans)] == ["a/x.nii.gz", "b.nii.gz", "c.mha"]


# --- API and CLI conventions -------------------------------------------------------------------


def test_predictor_from_model_returns_mask_and_probabilities(predictor, tmp_path):
    built = Predictor.from_model(
        predictor.model,
        predictor.plan,
        predictor.labels,
        config=predictor.config,  # trained without mirroring: no flip TTA (the default config mirrors)
        device="cpu",
        keep_largest=predictor.keep_largest,
    )
    image, _ = make_phantom(2, shape=TINY_SHAPE, spacing=TINY_SPACING, orientation="oblique")
    mask, probs = built.predict(image, probabilities=True)
    assert mask.shape == image.GetSize() and mask.dtype == np.uint8
    assert probs.shape == (len(predictor.labels), *image.GetSize())
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-3)  # the rim too
    kept = mask != 0  # keep-largest may have cleared pieces to background, nothing else
    np.testing.assert_array_equal(mask[kept], probs.argmax(axis=0)[kept])
    np.testing.assert_array_equal(mask, predictor.predict(image))
    # its identity (what a rerun compares) follows the weights: the same weights, the same hash
    import copy

    twin = Predictor.from_model(
        copy.deepcopy(predictor.model), predictor.plan, predictor.labels, device="cpu"
    )
    assert twin.sha256 == built.sha256 and len(built.sha256) == 64
    with torch.no_grad():
        next(twin.members[0].model.parameters()).view(-1)[0] += 1e-3
    nudged = Predictor.from_model(twin.members[0].model, predictor.plan, predictor.labels, device="cpu")
    assert nudged.sha256 != built.sha256


def test_cli_version_short_flags_quiet_and_plain_progress(tiny_run, tmp_path):
    from medseg import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"medseg {__version__}"
    scans = _scans(tmp_path / "scans", ["a.nii.gz", "b.nii.gz"])
    proc = run_cli(
        "predict", "-m", tiny_run["best"], "-i", str(scans), "-o", str(tmp_path / "out"), "--preview"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[1/2] written: a.nii.gz in ") and lines[1].startswith(
        "[2/2] written: b.nii.gz"
    )
    assert (tmp_path / "out" / "previews" / "a.nii.gz.png").stat().st_size > 1000
    proc = run_cli("predict", "-m", tiny_run["best"], "-i", str(scans), "-o", str(tmp_path / "out"), "-q")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines()[0].startswith("0 written, 2 skipped, 0 failed")


def test_label_counts_and_sums_by_slabs_match_one_bincount():
    from medseg.inference.batch import _per_label

    rng = np.random.default_rng(0)
    kji = rng.integers(0, 4, (50, 300, 400)).astype(np.uint8)  # 34 slices a slab: two slabs
    weights = rng.random(kji.shape).astype(np.float32)
    mask = kji.transpose()  # (i, j, k), as the predictor returns it
    np.testing.assert_array_equal(_per_label(mask, 5), np.bincount(kji.ravel(), minlength=5))
    np.testing.assert_allclose(
        _per_label(mask, 5, weights=weights), np.bincount(kji.ravel(), weights=weights.ravel(), minlength=5)
    )


def test_a_failing_preview_or_measurement_never_stops_the_batch(predictor, tmp_path, monkeypatch):
    import medseg.evaluation.pictures as pictures
    import medseg.inference.batch as batch

    drawn = []

    def flaky_figure(mask, target, *args, **kwargs):  # the first case's preview breaks
        drawn.append(Path(target).name)
        if len(drawn) == 1:
            raise RuntimeError("the font cache is gone")

    monkeypatch.setattr(pictures, "case_figure", flaky_figure)
    measure, measured = batch._Runner._measure, []

    def flaky_measure(self, mask, loaded):  # the second case's volumes break
        measured.append(1)
        if len(measured) == 2:
            raise MemoryError()
        return measure(self, mask, loaded)

    monkeypatch.setattr(batch._Runner, "_measure", flaky_measure)
    scans = _scans(tmp_path / "scans", ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    result = predict_many(predictor, scans, tmp_path / "out", preview=True)
    assert sorted(Path(p).name for p in result.written) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    rows = {Path(r["output"]).name: r for r in _rows(tmp_path / "out" / "predictions.csv")}
    assert rows["a.nii.gz"]["reason"] == "no preview: RuntimeError: the font cache is gone"
    assert rows["a.nii.gz"]["LV_ml"] != ""  # measured before the preview failed
    assert rows["b.nii.gz"]["reason"] == "no volumes: MemoryError: " and rows["b.nii.gz"]["LV_ml"] == ""
    assert rows["b.nii.gz"]["status"] == "written"  # the mask stands
    assert rows["c.nii.gz"]["reason"] == "" and rows["c.nii.gz"]["status"] == "written"
    assert len(drawn) == 3  # b's preview was still drawn
