"""The QC report: its pictures (planes the right way round), its page (worst case first, every
link and image there), the page in a real browser, and the commands."""

import csv
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.evaluation.pictures import case_figure, display_planes
from medseg.evaluation.report import qc_report
from medseg.io import read_volume
from tests.browser import Page, find_browser


@pytest.fixture(scope="module")
def masks(tiny_dataset, tmp_path_factory):
    """Predictions for the tiny dataset's three training cases: heart_000 exact, heart_001
    without its myocardium, heart_002 missing."""
    folder = tmp_path_factory.mktemp("masks")
    for name, drop in (("heart_000", None), ("heart_001", 2)):
        label = read_volume(tiny_dataset / "labelsTr" / f"{name}.nii.gz")
        array = sitk.GetArrayFromImage(label)
        if drop:
            array[array == drop] = 0
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(label)
        sitk.WriteImage(mask, str(folder / f"{name}.nii.gz"))
    return folder


def _table_cases(page: str) -> list[str]:
    body = page.split("<th class=name>case</th>", 1)[1].split("</table>", 1)[0]
    return re.findall(r"<td class=name>(?:<a [^>]*>)?([^<]+)", body)


def test_report_scores_sorts_and_draws(masks, tiny_dataset, tmp_path):
    out = tmp_path / "report"
    result = qc_report(
        masks,
        out,
        images=tiny_dataset / "imagesTr",
        ref_dir=tiny_dataset / "labelsTr",
        labels={0: "background", 1: "LV", 2: "myocardium", 3: "RV"},
        tolerance=3.0,
    )
    page = (out / "index.html").read_text()
    # worst first: the missing case (Dice 0), the one without myocardium, the exact one
    assert _table_cases(page) == ["heart_002", "heart_001", "heart_000"]
    assert "missing prediction" in page and "myocardium: prediction empty" in page
    label = read_volume(tiny_dataset / "labelsTr" / "heart_001.nii.gz")
    wall = np.count_nonzero(sitk.GetArrayViewFromImage(label) == 2) * np.prod(label.GetSpacing()) / 1000
    assert f"<td>0.0 ({wall:.1f})</td>" in page  # predicted volume (the reference's)
    assert sorted(p.name for p in (out / "cases").iterdir()) == [
        "heart_000.png",
        "heart_001.png",
        "heart_002.png",
    ]
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (out / src).stat().st_size > 5000
    assert "http" not in page.replace("http-equiv", "")  # nothing from the network
    evaluation = result["evaluation"]
    assert evaluation["missing_predictions"] == ["heart_002"]
    assert evaluation["mean"]["LV"] == pytest.approx(2 / 3)  # 1, 1 and the missing case's 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["case"] for r in rows} == {"heart_000", "heart_001", "heart_002"}
    assert (out / "summary.json").is_file()
    with pytest.raises(Exception, match="already exists; pass --overwrite"):
        qc_report(masks, out, images=tiny_dataset / "imagesTr")


def test_report_without_references_lists_volumes(masks, tiny_dataset, tmp_path):
    result = qc_report(masks, tmp_path / "r", images=tiny_dataset / "imagesTr")
    page = result["index"].read_text()
    assert _table_cases(page) == ["heart_000", "heart_001"]
    assert not (tmp_path / "r" / "metrics.csv").exists()
    label = read_volume(masks / "heart_000.nii.gz")
    lv = np.count_nonzero(sitk.GetArrayViewFromImage(label) == 1) * np.prod(label.GetSpacing()) / 1000
    assert f"<td>{lv:.1f}</td>" in page  # no reference: the volume alone


def test_a_case_that_cannot_be_read_is_named_and_the_rest_drawn(masks, tiny_dataset, tmp_path):
    broken, scans = tmp_path / "masks", tmp_path / "scans"
    for source, target in ((masks, broken), (tiny_dataset / "imagesTr", scans)):
        target.mkdir()
        for path in source.iterdir():
            (target / path.name).write_bytes(path.read_bytes())
    (broken / "heart_001.nii.gz").write_bytes(b"not an image")
    (scans / "heart_000.nii.gz").write_bytes(b"nor this")  # its contours are still drawn
    result = qc_report(broken, tmp_path / "r", images=scans, ref_dir=tiny_dataset / "labelsTr")
    assert list(result["problems"]) == ["heart_001"]
    assert list(result["evaluation"]["errors"]) == ["heart_001"]
    # heart_000, the missing heart_002, and heart_001 whose unreadable prediction scores 0
    assert result["evaluation"]["summary"]["cases_scored"] == 3
    assert result["evaluation"]["summary"]["cases_not_scored"] == []
    assert sorted(p.name for p in (tmp_path / "r" / "cases").iterdir()) == ["heart_000.png", "heart_002.png"]
    page = result["index"].read_text()
    assert "heart_001.nii.gz: " in page and "scan not drawn: " in page


def test_planes_are_shown_as_radiologists_read_them():
    # An RAS-stored volume (i toward the patient's right, j anterior, k superior) with a bright
    # block at the patient's left, anterior and superior corner.
    array = np.zeros((20, 30, 40), np.float32)  # (k, j, i)
    array[15:, 20:, :8] = 1  # superior, anterior, left (low i)
    image = sitk.GetImageFromArray(array)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    centre = (17, 5, 35)  # in the LPS-oriented (k, j, i) array: superior, anterior, left
    (axial_name, axial), (_, coronal), (_, sagittal) = display_planes(image, centre)
    assert axial_name.startswith("axial")

    def corner(plane):
        rows, cols = np.nonzero(plane)
        return ("top" if rows.mean() < plane.shape[0] / 2 else "bottom") + (
            "-left" if cols.mean() < plane.shape[1] / 2 else "-right"
        )

    assert corner(axial) == "top-right"  # anterior up; the patient's left on the viewer's right
    assert corner(coronal) == "top-right"  # superior up
    assert corner(sagittal) == "top-left"  # superior up, anterior to the left


def test_case_figure_draws_a_2d_image(tmp_path):
    mask = sitk.GetImageFromArray(np.pad(np.ones((10, 10), np.uint8), 5))
    png = case_figure(mask, tmp_path / "a.png", ref=mask, title="2D")
    assert png.stat().st_size > 2000


def test_report_command(masks, tiny_dataset, tmp_path, capsys):
    args = ["report", "--pred", str(masks), "--images", str(tiny_dataset / "imagesTr")]
    args += ["--ref", str(tiny_dataset / "labelsTr"), "--out", str(tmp_path / "r")]
    assert main(args) == 1  # a prediction is missing: the run says so
    out = capsys.readouterr().out
    assert "no prediction (scored 0): heart_002" in out and "QC report:" in out
    assert main([*args, "--overwrite", "--tolerance", "LV=x"]) == 2
    assert "--tolerance: 'LV=x' is not MM or CLASS=MM" in capsys.readouterr().err


def test_report_in_a_browser(masks, tiny_dataset, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium): the report was not opened in a browser")
    out = tmp_path / "report"
    qc_report(masks, out, images=tiny_dataset / "imagesTr", ref_dir=tiny_dataset / "labelsTr")
    try:
        with Page(browser) as page:
            seen = page.open((out / "index.html").as_uri())
            page.screenshot(tmp_path / "report.png")
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        pytest.fail(f"{browser} could not show the report: {err}")
    assert len(seen["images"]) == 3
    for image in seen["images"]:
        assert image["complete"] and image["width"] > 100, image  # loaded, not broken
    assert all(url.startswith("file://") for url in seen["requests"]), seen["requests"]
    for link in seen["links"]:
        target = link.split("#", 1)[0]
        assert not target or (out / target).is_file(), link
    assert (tmp_path / "report.png").stat().st_size > 20000
    shot = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "report.png")))
    assert shot.std() > 10  # a page with content, not a blank one


def test_training_draws_its_validation_cases(tiny_run):
    import json

    run = Path(tiny_run["best"]).parent
    val = json.loads((run / "splits.json").read_text())["val"]
    assert val  # the tiny run validates one case
    assert sorted(p.stem for p in (run / "validation").glob("*.png")) == sorted(val)[:2]
