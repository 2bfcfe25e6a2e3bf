"""Segmenting straight from a PACS over DICOMweb, against a real Orthanc (Debian's orthanc and
orthanc-dicomweb; the tests skip, saying so, where it is not installed)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import ConfigError
from medseg.inference.batch import predict_many
from medseg.inference.dicomweb import connect, parse_query, predict_dicomweb
from medseg.inference.predictor import Predictor
from tests.conftest import learned_phantom, run_cli, write_dicom_series

ORTHANC = shutil.which("Orthanc")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
needs_orthanc = pytest.mark.skipif(
    not ORTHANC or not PLUGIN.is_file(),
    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)",
)
pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicomweb_client", reason='pip install "medseg[pacs]"')
pytest.importorskip("highdicom", reason='pip install "medseg[dicom]"')


UIDS = ("0020000D", "0020000E", "00080018")  # study, series, instance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_orthanc(folder: Path, http: int) -> subprocess.Popen:
    """Orthanc on localhost port ``http`` with DICOMweb, its database in ``folder`` (so a restart
    finds what it held); returns once it answers."""
    config = {
        "Name": "medseg-test",
        "StorageDirectory": str(folder / "orthanc"),
        "IndexDirectory": str(folder / "orthanc"),
        "HttpPort": http,
        "DicomPort": _free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "a") as log:
        server = subprocess.Popen(
            [ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=1)
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    pytest.fail("Orthanc did not start: " + (folder / "orthanc.log").read_text()[-2000:])


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def orthanc(tmp_path):
    """A private Orthanc on free localhost ports, with DICOMweb; its address and REST root."""
    http = _free_port()
    server = _start_orthanc(tmp_path, http)
    yield f"dicomweb://127.0.0.1:{http}/dicom-web", f"http://127.0.0.1:{http}"
    _stop(server)


def _upload(address: str, folder: Path) -> None:
    client = connect(address)
    client.store_instances([pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))])


def _instances(rest: str, modality: str) -> list[str]:
    query = json.dumps({"Level": "Instance", "Query": {"Modality": modality}}).encode()
    request = urllib.request.Request(f"{rest}/tools/find", data=query, method="POST")
    return json.loads(urllib.request.urlopen(request).read())


@needs_orthanc
def test_series_are_pulled_segmented_and_stored_back_as_dicom_seg(learned_run, orthanc, tmp_path):
    address, rest = orthanc
    _, summary = learned_run
    series = {"1.2.826.0.1.3680043.2.1125.71": (501, ()), "1.2.826.0.1.3680043.2.1125.72": (502, ())}
    series["1.2.826.0.1.3680043.2.1125.73"] = (503, (5,))  # a slice missing: a gap in the series
    for uid, (seed, skip) in series.items():
        image, _ = learned_phantom(seed)
        _upload(address, write_dicom_series(image, tmp_path / "sent" / uid, uid=uid, skip=skip))
    predictor = Predictor(summary["best"], device="cpu")

    result = predict_dicomweb(predictor, address, tmp_path / "out")
    stored = _instances(rest, "SEG")
    assert len(stored) == 2 and len(result.written) == 2
    assert list(result.failed) and all(".73" in where for where in result.failed)  # the gap, named

    # What the server holds is the SEG a folder prediction writes, referencing its source series.
    for uid in list(series)[:2]:
        local = predict_many(predictor, tmp_path / "sent" / uid, tmp_path / "local" / uid, fmt="dicom-seg")
        ours = pydicom.dcmread(local.written[0])
        client = connect(address)
        found = client.search_for_instances(search_filters={"Modality": "SEG"})
        theirs = [client.retrieve_instance(*(f[t]["Value"][0] for t in UIDS)) for f in found]
        match = [s for s in theirs if s.ReferencedSeriesSequence[0].SeriesInstanceUID == uid]
        assert len(match) == 1
        np.testing.assert_array_equal(match[0].pixel_array, ours.pixel_array)
        assert match[0].StudyInstanceUID == uid + ".0"

    # A rerun stores nothing new: the server, asked, holds this model's SEG of both series (each
    # SEG names the model's SHA-256), so they are not fetched again, though the spool is gone.
    spool = tmp_path / "out.spool"
    assert not [p for p in spool.rglob("*.dcm") if ".73" not in str(p)]  # stored: spool emptied
    shutil.rmtree(spool)
    again = predict_dicomweb(predictor, address, tmp_path / "out")
    assert len(_instances(rest, "SEG")) == 2 and list(again.failed)  # the gap, again
    assert not again.written and not again.skipped  # not fetched, so not even looked at
    assert not [p for p in spool.rglob("*.dcm") if ".73" not in str(p)]
    # A query selects series by their attributes: no CT here; of the MR, only the gap is left.
    ct = predict_dicomweb(predictor, address, tmp_path / "ct", query="Modality=CT")
    assert not ct.written and not ct.failed
    mr = predict_dicomweb(predictor, address, tmp_path / "mr", query={"Modality": "MR"})
    assert not mr.written and [w for w in mr.failed if ".73" in w] == list(mr.failed) != []

    # The command line, for a new series, into another folder: one more SEG on the server.
    new = "1.2.826.0.1.3680043.2.1125.74"
    image, _ = learned_phantom(504)
    _upload(address, write_dicom_series(image, tmp_path / "sent" / new, uid=new))
    args = ["predict", "-m", summary["best"], "-i", address, "--series", new, "-o", str(tmp_path / "cli")]
    proc = run_cli(*args, "--statistics", "--preview")
    assert proc.returncode == 0, proc.stderr
    assert "1 written, 0 skipped, 0 failed" in proc.stdout and "Traceback" not in proc.stderr
    assert len(_instances(rest, "SEG")) == 3
    assert len(list((tmp_path / "cli" / "previews").rglob("*.png"))) == 1  # mirroring STUDY/SERIES
    assert "LV_mean" in (tmp_path / "cli" / "predictions.csv").read_text().splitlines()[0]
    # Again: nothing new to fetch or segment, and the summary says so without a report to name.
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"0 written, 0 skipped, 0 failed; masks in {tmp_path / 'cli'}")
    assert len(_instances(rest, "SEG")) == 3


@needs_orthanc
def test_a_server_stopped_mid_batch_is_reported_and_a_rerun_finishes(learned_run, tmp_path, monkeypatch):
    import medseg.inference.dicomweb as dicomweb

    monkeypatch.setattr(dicomweb, "BACKOFF_S", 0.05)  # the retries, quicker
    http = _free_port()
    server = _start_orthanc(tmp_path, http)
    address, rest = f"dicomweb://127.0.0.1:{http}/dicom-web", f"http://127.0.0.1:{http}"
    _, summary = learned_run
    uids = ["1.2.826.0.1.3680043.2.1125.75", "1.2.826.0.1.3680043.2.1125.76"]
    for seed, uid in enumerate(uids, 505):
        _upload(address, write_dicom_series(learned_phantom(seed)[0], tmp_path / "sent" / uid, uid=uid))
    report = pydicom.dcmread(next((tmp_path / "sent" / uids[0]).glob("*.dcm")))
    report.Modality, report.SeriesInstanceUID = "SR", "1.2.826.0.1.3680043.2.1125.77"  # not an image
    report.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.77.1"
    connect(address).store_instances([report])
    predictor = Predictor(summary["best"], device="cpu")
    stopped = []

    def stop_the_server(record, number, total):  # the series are fetched; the server goes down
        if not stopped:
            _stop(server)
            stopped.append(number)

    try:
        down = predict_dicomweb(predictor, address, tmp_path / "out", on_case=stop_the_server)
        assert stopped and len(down.failed) == 2  # both stores failed, reported, nothing crashed
        assert all("failed after 3 tries" in reason for reason in down.failed.values())
        account = json.loads((tmp_path / "out" / "stored.json").read_text())
        assert {e["status"] for e in account.values()} == {"failed"} and set(account) == set(uids)

        server = _start_orthanc(tmp_path, http)  # back, with the images it held
        again = predict_dicomweb(predictor, address, tmp_path / "out")
        assert not again.failed and len(again.skipped) == 2  # made before, stored now
        assert len(_instances(rest, "SEG")) == 2
        account = json.loads((tmp_path / "out" / "stored.json").read_text())
        assert {e["status"] for e in account.values()} == {"stored"}
        for uid in uids:  # the account names the source's instances and the SEG on the server
            sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "sent" / uid).glob("*.dcm")}
            assert set(account[uid]["instances"]) == sent and account[uid]["study"] == uid + ".0"
        stored_segs = {s["MainDicomTags"]["SOPInstanceUID"] for s in _instance_tags(rest, "SEG")}
        assert {e["seg_sop_instance_uid"] for e in account.values()} == stored_segs
        assert not [u for u in uids if (tmp_path / "out.spool" / (u + ".0") / u).exists()]  # spool emptied
    finally:
        _stop(server)


def _instance_tags(rest: str, modality: str) -> list[dict]:
    query = json.dumps({"Level": "Instance", "Query": {"Modality": modality}, "Expand": True}).encode()
    request = urllib.request.Request(f"{rest}/tools/find", data=query, method="POST")
    return json.loads(urllib.request.urlopen(request).read())


def test_credentials_are_refused_in_the_address():
    with pytest.raises(ConfigError, match="credentials in an address"):
        connect("dicomweb://doctor:secret@127.0.0.1:8042/dicom-web")
    with pytest.raises(ConfigError, match="is not dicomweb://HOST:PORT/PATH"):
        connect("http://127.0.0.1:8042/dicom-web")


@pytest.mark.parametrize(
    "option, message",
    [
        (["--shard", "0/2"], "error: --shard: is for files and folders"),
        (["--save-probabilities"], "error: --save-probabilities: is for files and folders"),
        (["--format", "nifti"], "error: --format: a DICOMweb source gets DICOM-SEGs"),
    ],
)
def test_options_a_dicomweb_source_cannot_honour_are_refused(tmp_path, option, message):
    address = "dicomweb://127.0.0.1:9/dicom-web"  # never reached: refused before anything loads
    proc = run_cli("predict", "-m", str(tmp_path / "none.pt"), "-i", address, "-o", str(tmp_path), *option)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_query_is_read_into_search_filters_and_bad_ones_are_named(tmp_path):
    assert parse_query("Modality=MR&StudyDate=20260101-") == {"Modality": "MR", "StudyDate": "20260101-"}
    with pytest.raises(ConfigError, match="'Modality' is not KEYWORD=VALUE"):
        parse_query("Modality")
    with pytest.raises(ConfigError, match="'PatientShoeSize' is not a DICOM keyword"):
        parse_query("Modality=MR&PatientShoeSize=44")
    files = ["-m", str(tmp_path / "none.pt"), "-i", str(tmp_path), "-o", str(tmp_path / "o")]
    proc = run_cli("predict", *files, "--query", "Modality=MR")
    assert proc.returncode == 2 and "error: --query: goes with -i dicomweb://" in proc.stderr
