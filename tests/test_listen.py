"""``medseg listen``: a DICOM node that receives series by C-STORE, segments each and sends its
DICOM-SEG on, against pynetdicom peers (a sender, and a store SCP as the destination)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import ConfigError
from medseg.inference.batch import predict_many
from medseg.inference.listener import Listener, Tls, parse_destination
from medseg.inference.predictor import Predictor
from tests.conftest import learned_phantom, write_dicom_series

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom", reason='pip install "medseg[pacs]"')
pytest.importorskip("highdicom", reason='pip install "medseg[dicom]"')

SENDER, DESTINATION = "MODALITY", "ARCHIVE"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _archive(ssl_context=None):
    """A store SCP standing for the PACS the SEGs go to: (its server, port, the datasets it got)."""
    from pynetdicom.sop_class import SegmentationStorage

    received = []

    def on_store(event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0x0000

    ae = pynetdicom.AE(ae_title=DESTINATION)
    ae.add_supported_context(SegmentationStorage)
    port = _free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=ssl_context,
        evt_handlers=[(pynetdicom.evt.EVT_C_STORE, on_store)],
    )
    return server, port, received


@pytest.fixture
def archive():
    server, port, received = _archive()
    yield port, received
    server.shutdown()


def _send(files: list[Path], port: int, calling: str = SENDER, tls=None) -> bool:
    """C-STORE the files to the listener as a modality would; whether it accepted them all."""
    datasets = [pydicom.dcmread(p) for p in files]
    ae = pynetdicom.AE(ae_title=calling)
    for syntax_class in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(syntax_class[0], [syntax_class[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG", tls_args=(tls, "localhost") if tls else None)
    if not assoc.is_established:
        return False
    statuses = [assoc.send_c_store(d) for d in datasets]
    assoc.release()
    return all(s and s.Status == 0x0000 for s in statuses)


def _wait_for(condition, seconds: float, every=None, what="") -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if every:
            every()
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"waited {seconds} s for {what}")


def _same_seg_as_from_a_folder(predictor, sent: Path, got, tmp_path: Path) -> None:
    local = predict_many(predictor, sent, tmp_path / "local" / sent.name, fmt="dicom-seg")
    ours = pydicom.dcmread(local.written[0])
    np.testing.assert_array_equal(got.pixel_array, ours.pixel_array)
    assert got.ReferencedSeriesSequence[0].SeriesInstanceUID == sent.name
    referenced = {
        i.ReferencedSOPInstanceUID for i in got.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {str(pydicom.dcmread(p).SOPInstanceUID) for p in sent.glob("*.dcm")}


def test_received_series_are_segmented_and_their_segs_sent_on(learned_run, archive, tmp_path):
    port, received = archive
    _, summary = learned_run
    predictor = Predictor(summary["best"], device="cpu")
    series = {"1.2.826.0.1.3680043.2.1125.81": (601, ()), "1.2.826.0.1.3680043.2.1125.82": (602, ())}
    series["1.2.826.0.1.3680043.2.1125.83"] = (603, (5,))  # a slice missing: a gap in the series
    for uid, (seed, skip) in series.items():
        write_dicom_series(learned_phantom(seed)[0], tmp_path / "sent" / uid, uid=uid, skip=skip)
    report = pydicom.dcmread(next((tmp_path / "sent" / list(series)[0]).glob("*.dcm")))
    report.Modality, report.SOPInstanceUID = "SR", "1.2.826.0.1.3680043.2.1125.89.1"  # not an image
    report.save_as(tmp_path / "report.dcm")
    listen_port = _free_port()
    listener = Listener(
        predictor,
        tmp_path / "out",
        f"{DESTINATION}@127.0.0.1:{port}",
        port=listen_port,
        allowed=[SENDER],
        quiet_period=0.5,
    )
    listener.start()
    try:
        assert not _send(sorted((tmp_path / "sent").rglob("*.dcm")), listen_port, calling="STRANGER")
        assert not list(listener.incoming.rglob("*.dcm"))  # an unknown caller is refused outright
        for uid in series:
            assert _send(sorted((tmp_path / "sent" / uid).glob("*.dcm")), listen_port)
        assert _send([tmp_path / "report.dcm"], listen_port)  # stored (acknowledged), not segmented
        _wait_for(lambda: len(received) == 2, 120, every=listener.poll, what="two SEGs at the archive")
        gap = listener.failed / "1.2.826.0.1.3680043.2.1125.83.0" / "1.2.826.0.1.3680043.2.1125.83"
        _wait_for(gap.is_dir, 60, every=listener.poll, what="the gap set aside")  # its own poll, maybe
    finally:
        listener.stop()
    assert len(received) == 2
    for got in received:
        uid = got.ReferencedSeriesSequence[0].SeriesInstanceUID
        _same_seg_as_from_a_folder(predictor, tmp_path / "sent" / uid, got, tmp_path)
        assert got.StudyInstanceUID == uid + ".0"
        assert (tmp_path / "out" / (uid + ".0") / uid / "sent.json").is_file()
    # Sent: the spool is empty. The gap is kept aside, whole, for a person; the report never spooled.
    assert not list(listener.incoming.rglob("*.dcm"))
    assert len(list(gap.glob("*.dcm"))) == 15
    assert "89" not in " ".join(str(p) for p in tmp_path.rglob("*.dcm") if "sent" not in str(p))


def _listen(model: str, out: Path, port: int, archive_port: int, log) -> subprocess.Popen:
    args = ["listen", "-m", model, "-o", str(out), "--port", str(port), "--quiet-period", "4"]
    args += ["--send-to", f"{DESTINATION}@127.0.0.1:{archive_port}", "--allow-ae", SENDER, "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseg", *args], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    ae = pynetdicom.AE(ae_title=SENDER)
    ae.add_requested_context(pynetdicom.sop_class.Verification)
    for _ in range(300):  # until it answers a C-ECHO
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
        if assoc.is_established:
            assoc.release()
            return proc
        assert proc.poll() is None, "the listener stopped"
        time.sleep(0.2)
    pytest.fail("the listener did not answer")


def test_a_listener_killed_mid_series_delivers_one_seg_after_a_restart(learned_run, archive, tmp_path):
    port, received = archive
    _, summary = learned_run
    uid = "1.2.826.0.1.3680043.2.1125.91"
    files = sorted(
        write_dicom_series(learned_phantom(611)[0], tmp_path / "sent" / uid, uid=uid).glob("*.dcm")
    )
    listen_port = _free_port()
    log = open(tmp_path / "listen.log", "w")
    first = _listen(summary["best"], tmp_path / "out", listen_port, port, log)
    assert _send(files[:7], listen_port)
    os.kill(first.pid, signal.SIGKILL)  # mid-series: 7 of 16 slices spooled, nothing segmented
    first.wait()
    spooled = tmp_path / "out.spool" / "incoming" / (uid + ".0") / uid
    assert len(list(spooled.glob("*.dcm"))) == 7 and not received

    second = _listen(summary["best"], tmp_path / "out", listen_port, port, log)
    try:
        assert _send(files[7:], listen_port)  # the modality sends the rest
        _wait_for(
            lambda: (tmp_path / "out" / (uid + ".0") / uid / "sent.json").is_file(), 120, what="the SEG"
        )
        time.sleep(5)  # more than a quiet period: no second SEG follows
    finally:
        second.send_signal(signal.SIGTERM)
        code = second.wait(timeout=30)
        log.close()
    text = (tmp_path / "listen.log").read_text()
    assert code == 0 and "Traceback" not in text, text
    assert len(received) == 1
    _same_seg_as_from_a_folder(
        Predictor(summary["best"], device="cpu"), tmp_path / "sent" / uid, received[0], tmp_path
    )
    assert "Phantom" not in text and "PHANTOM-1" not in text  # no patient name or ID in the log


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command to make a certificate")
def test_a_tls_node_takes_tls_callers_only_and_sends_over_tls(learned_run, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    server, port, received = _archive(served)  # the PACS speaks TLS too
    _, summary = learned_run
    uid = "1.2.826.0.1.3680043.2.1125.95"
    write_dicom_series(learned_phantom(621)[0], tmp_path / "sent" / uid, uid=uid)
    listen_port = _free_port()
    tls = Tls(cert=str(cert), key=str(key), ca=str(cert), send=True)  # mutual: callers show a cert
    listener = Listener(
        Predictor(summary["best"], device="cpu"),
        tmp_path / "out",
        f"{DESTINATION}@127.0.0.1:{port}",
        port=listen_port,
        allowed=[SENDER],
        quiet_period=0.5,
        tls=tls,
    )
    listener.start()
    try:
        files = sorted((tmp_path / "sent" / uid).glob("*.dcm"))
        assert not _send(files, listen_port)  # plain DICOM to a TLS node: no association
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assert not _send(files, listen_port, tls=anonymous)  # TLS without a client certificate
        caller = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        caller.load_cert_chain(cert, key)
        assert _send(files, listen_port, tls=caller)
        _wait_for(lambda: len(received) == 1, 120, every=listener.poll, what="the SEG over TLS")
    finally:
        listener.stop()
        server.shutdown()
    assert received[0].ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    with pytest.raises(ConfigError, match="--tls-cert: goes with --tls-key"):
        Tls(cert=str(cert))
    with pytest.raises(ConfigError, match="--tls-ca: .*nowhere.pem: no such file"):
        Tls(ca=str(tmp_path / "nowhere.pem"))


def test_destinations_and_ae_titles_are_checked(tmp_path):
    assert str(parse_destination("PACS@10.0.0.5:104")) == "PACS@10.0.0.5:104"
    for bad in ("PACS@10.0.0.5", "10.0.0.5:104", "PACS@host:port", "A" * 17 + "@h:104"):
        with pytest.raises(ConfigError, match="--send-to"):
            parse_destination(bad)
    with pytest.raises(ConfigError, match="--allow-ae: 'BAD\\\\\\\\AE' is not an AE title"):
        Listener(None, tmp_path / "out", "PACS@127.0.0.1:104", allowed=["BAD\\AE"])
