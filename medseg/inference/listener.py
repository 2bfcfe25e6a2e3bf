"""A DICOM node for sites without DICOMweb: receive series by C-STORE, segment each one once its
images stop arriving, and send its DICOM-SEG on by C-STORE (``pynetdicom``).

Everything lives in files, so a crash loses nothing and a restart finishes the work:

- ``OUTPUT.spool/incoming/STUDY/SERIES/SOP.dcm``: each image as received, written atomically
  before the sender is told it is stored.
- A series is complete when none of its images arrived for the quiet period, counted from the
  listener's own start too: after a restart, a series cut off mid-transfer gets a full quiet
  period for the rest to arrive.
- ``OUTPUT/STUDY/SERIES/``: the SEG and that series' ``predictions.csv`` and ``run.json``, as
  ``predict_many`` writes them; ``sent.json`` once the destination accepted the SEG. The spool
  copy goes only then. A SEG whose sending failed is sent again later; sent twice, it is the
  same object (the same SOP instance UID), so the destination holds it once.
- ``OUTPUT.spool/failed/STUDY/SERIES/``: series that could not be segmented (a gap in the slices,
  not an image), kept for a person to look at, never retried by themselves.

Only UIDs name files and log lines, never a patient's name or ID. The node listens on localhost
unless told otherwise, and accepts associations only from the calling AE titles it is given.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.atomic import atomic_path
from medseg.dicom import NON_IMAGE_MODALITIES
from medseg.errors import ConfigError, InputError, first_line
from medseg.inference.batch import predict_many
from medseg.inference.dicomweb import retried

__all__ = ["Destination", "Listener", "Tls", "parse_destination", "send_dataset"]

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # what DICOM allows in a UID: safe as a file name
_AE_TITLE = re.compile(r"^[ -~]{1,16}$")  # 16 printable characters at most, no backslash below
RETRY_AFTER_S = 30.0  # a round that failed is tried again after this long
_SUCCESS, _OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class Destination:
    """Where SEGs go: a DICOM node's AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Tls:
    """TLS for the node. ``cert`` and ``key`` (PEM): this node's certificate, to listen over
    TLS (and to show when sending); ``ca`` (PEM): whom to trust, the destination's certificate
    checked against it when sending (default: the system's store), and, when listening over
    TLS, callers must show a certificate it signed; ``send``: send the SEGs over TLS."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    send: bool = False

    def __post_init__(self):
        if bool(self.cert) != bool(self.key):
            raise ConfigError("--tls-cert", "goes with --tls-key: a certificate and its private key")
        for option, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path and not Path(path).is_file():
                raise ConfigError(option, f"{path}: no such file")

    def server_context(self) -> ssl.SSLContext | None:
        """For listening: None without a certificate (plain DICOM)."""
        if not self.cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        context.verify_mode = ssl.CERT_REQUIRED if self.ca else ssl.CERT_NONE
        return context

    def client_context(self) -> ssl.SSLContext | None:
        """For sending: None unless ``send``; verifies the destination's certificate."""
        if not self.send:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context


def parse_destination(text: str) -> Destination:
    """``AE@HOST:PORT``, e.g. ``PACS@10.0.0.5:104``.

    Raises:
        ConfigError: not of that form, or an AE title DICOM does not allow.
    """
    title, at, place = text.rpartition("@")
    host, colon, port = place.rpartition(":")
    if not (at and colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError("--send-to", f"{text!r} is not AE@HOST:PORT, e.g. PACS@127.0.0.1:4242")
    return Destination(_ae_title(title, "--send-to"), host, int(port))


def _ae_title(title: str, option: str) -> str:
    if not _AE_TITLE.match(title) or "\\" in title or not title.strip():
        raise ConfigError(option, f"{title!r} is not an AE title (1-16 printable characters, no backslash)")
    return title.strip()


def _need_pynetdicom():
    try:
        import pynetdicom
    except ImportError:
        raise ConfigError("listen", 'a DICOM node needs pynetdicom: pip install "medseg[pacs]"') from None
    return pynetdicom


def send_dataset(
    dataset, destination: Destination, calling_ae: str, what: str, tls: ssl.SSLContext | None = None
) -> None:
    """C-STORE one dataset to ``destination``, retried as DICOMweb calls are (``retried``);
    over TLS with ``tls`` (a client context that checks the destination's certificate).

    Raises:
        InputError: naming ``what``, when every try failed (no association, or a store status
            that is not success or a warning).
    """
    pynetdicom = _need_pynetdicom()
    ae = pynetdicom.AE(ae_title=calling_ae)
    ae.add_requested_context(dataset.SOPClassUID, [str(dataset.file_meta.TransferSyntaxUID)])

    def attempt() -> None:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=(tls, destination.host) if tls else None,
        )
        if not assoc.is_established:
            raise ConnectionError(f"{destination} did not accept an association from {calling_ae}")
        try:
            status = assoc.send_c_store(dataset)
        finally:
            assoc.release()
        code = int(status.Status) if status and "Status" in status else None
        if code is None:
            raise ConnectionError("no answer to the store")
        if code != _SUCCESS and code >> 12 != 0xB:  # 0xBxxx: stored, with a warning
            raise ConnectionError(f"the store was refused (status 0x{code:04X})")

    retried(what, attempt)


class Listener:
    """Receive, segment and send on; see the module's docstring for where everything lives.

    Args:
        predictor: the model.
        output_dir: each series' SEG and reports under ``STUDY/SERIES/``; the spool beside it.
        send_to: the destination of the SEGs (a ``Destination`` or ``AE@HOST:PORT``).
        ae_title: this node's AE title, also the calling AE title when sending.
        host, port: where to listen; localhost unless told otherwise.
        allowed: the calling AE titles accepted; None: only the destination's.
        quiet_period: seconds without a new image after which a series is complete.
        tls: TLS for listening and sending (``Tls``); None: plain DICOM.
    """

    def __init__(
        self,
        predictor,
        output_dir: str | Path,
        send_to: Destination | str,
        *,
        ae_title: str = "MEDSEG",
        host: str = "127.0.0.1",
        port: int = 11112,
        allowed: list[str] | None = None,
        quiet_period: float = 10.0,
        tls: Tls | None = None,
    ) -> None:
        if quiet_period < 0:
            raise ConfigError("--quiet-period", f"{quiet_period} is negative")
        self.predictor = predictor
        self.output_dir = Path(output_dir)
        spool = self.output_dir.with_name(self.output_dir.name + ".spool")
        self.incoming, self.failed = spool / "incoming", spool / "failed"
        self.send_to = send_to if isinstance(send_to, Destination) else parse_destination(send_to)
        self.ae_title = _ae_title(ae_title, "--ae-title")
        self.address = (host, port)
        self.allowed = [_ae_title(a, "--allow-ae") for a in (allowed or [self.send_to.ae_title])]
        self.quiet_period = quiet_period
        self.tls = tls or Tls()
        self.started = time.time()
        self._server = None
        self._retry_at: dict[Path, float] = {}  # series whose SEG could not be sent: when to try again

    def start(self) -> None:
        """Listen for associations (in background threads) and take C-STORE and C-ECHO."""
        pynetdicom = _need_pynetdicom()
        from pynetdicom.sop_class import Verification

        self.incoming.mkdir(parents=True, exist_ok=True)
        ae = pynetdicom.AE(ae_title=self.ae_title)
        ae.supported_contexts = pynetdicom.AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.require_calling_aet = self.allowed
        self.started = time.time()
        try:
            self._server = ae.start_server(
                self.address,
                block=False,
                ssl_context=self.tls.server_context(),
                evt_handlers=[(pynetdicom.evt.EVT_C_STORE, self._on_store)],
            )
        except OSError as exc:
            raise ConfigError(
                "--port", f"cannot listen on {self.address[0]}:{self.address[1]} ({exc})"
            ) from None
        log.info(
            "%s listening on %s:%d%s for %s; SEGs go to %s%s",
            self.ae_title,
            *self.address,
            " (TLS)" if self.tls.cert else "",
            ", ".join(self.allowed),
            self.send_to,
            " (TLS)" if self.tls.send else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event) -> int:
        """Spool one received object; only then is the sender told it is stored."""
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        uids = [str(dataset.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not all(_UID.match(u) for u in uids):
            log.warning("refused an object without valid study, series and instance UIDs")
            return _CANNOT_UNDERSTAND
        study, series, sop = uids
        if str(dataset.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            log.info("series %s: a %s object, not an image: not segmented", series, dataset.Modality)
            return _SUCCESS
        folder = self.incoming / study / series
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / f"{sop}.dcm") as tmp:
                dataset.save_as(tmp, enforce_file_format=True)
        except OSError as exc:
            log.error("series %s: could not spool an image (%s)", series, first_line(exc))
            return _OUT_OF_RESOURCES
        return _SUCCESS

    def complete_series(self, now: float | None = None) -> list[Path]:
        """Spooled series none of whose images arrived for the quiet period (nor since start)."""
        now = time.time() if now is None else now
        found = []
        for folder in sorted(self.incoming.glob("*/*")):
            times = [p.stat().st_mtime for p in folder.glob("*.dcm")]
            if times and now - max(max(times), self.started) >= self.quiet_period:
                if self._retry_at.get(folder, 0.0) <= now:
                    found.append(folder)
        return found

    def poll(self) -> list[str]:
        """Segment and send every complete series once; returns the series UIDs sent."""
        sent = []
        for folder in self.complete_series():
            try:
                if self._process(folder):
                    sent.append(folder.name)
            except Exception as exc:  # a node must outlive any one series: log, and try it later
                self._retry_at[folder] = time.time() + RETRY_AFTER_S
                log.error(
                    "series %s: %s; trying again in %.0f s", folder.name, first_line(exc), RETRY_AFTER_S
                )
        return sent

    def _process(self, source: Path) -> bool:
        study, series = source.parent.name, source.name
        out = self.output_dir / study / series
        images = len(list(source.glob("*.dcm")))
        log.info("series %s: %d image(s) received, segmenting", series, images)
        result = predict_many(self.predictor, source, out, fmt="dicom-seg")
        made = [
            out / r["output"]
            for r in result.records
            if r.get("status") in ("written", "skipped") and r.get("output")
        ]
        if result.failed or len(made) != 1:
            reasons = "; ".join(result.failed.values()) or f"{len(made)} segmentations instead of one"
            log.error("series %s: not segmented (%s); its images are in %s", series, reasons, self.failed)
            self._move(source, self.failed / study / series)
            return False
        import pydicom

        segmentation = pydicom.dcmread(made[0])
        try:
            what = f"the SEG of series {series}"
            send_dataset(segmentation, self.send_to, self.ae_title, what, self.tls.client_context())
        except InputError as exc:
            self._retry_at[source] = time.time() + RETRY_AFTER_S
            log.error("%s; trying again in %.0f s", exc, RETRY_AFTER_S)
            return False
        self._retry_at.pop(source, None)
        record = {
            "series": series,
            "images": images,
            "segmentation": made[0].name,
            "sop_instance_uid": str(segmentation.SOPInstanceUID),
            "sent_to": str(self.send_to),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with atomic_path(out / "sent.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        shutil.rmtree(source)  # sent and recorded: the spool copy has done its job
        _remove_if_empty(source.parent)
        log.info("series %s: SEG sent to %s", series, self.send_to)
        return True

    @staticmethod
    def _move(source: Path, target: Path) -> None:
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        _remove_if_empty(source.parent)

    def serve_forever(self, poll_every: float = 1.0) -> None:
        """Listen and work until interrupted (Ctrl-C or SIGTERM); stops the server on the way out."""
        self.start()
        try:
            while True:
                self.poll()
                time.sleep(poll_every)
        finally:
            self.stop()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: other series of the study are still there
