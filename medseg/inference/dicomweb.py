"""Segment series straight from a PACS over DICOMweb: search the series (QIDO-RS), retrieve each
into a spool folder (WADO-RS), segment them with the batch run (its per-case failures, reports
and reruns), and store each DICOM-SEG back (STOW-RS). The client is ``dicomweb-client``.

Addresses are ``dicomweb://HOST:PORT/PATH`` (http) or ``dicomwebs://...`` (https, TLS).
Credentials come from the environment, never from the command line, and are never logged:
``MEDSEG_DICOMWEB_TOKEN`` (a bearer token), or ``MEDSEG_DICOMWEB_USER`` with
``MEDSEG_DICOMWEB_PASSWORD``. Files are named by UID only, never by a patient's name or ID.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from medseg.atomic import atomic_path
from medseg.errors import ConfigError, InputError, first_line
from medseg.inference.batch import BatchResult, predict_many

__all__ = ["is_dicomweb", "connect", "predict_dicomweb", "SPOOL_SUFFIX"]

log = logging.getLogger(__name__)

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
SPOOL_SUFFIX = ".spool"  # the retrieved series wait beside the output folder, in OUTPUT.spool
STORED = ".stored"  # left in a spool series folder, emptied, once its SEG is stored
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # what DICOM allows in a UID: safe as a file name
ATTEMPTS, BACKOFF_S = 3, 1.0  # network calls are retried with a doubling pause, then reported
_STUDY, _SERIES, _MODALITY, _SOP = "0020000D", "0020000E", "00080060", "00080018"
NOT_IMAGES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC"}  # series that hold no image to segment


def is_dicomweb(address) -> bool:
    """Whether an input or output names a DICOMweb server rather than a path."""
    return str(address).split("://", 1)[0] in SCHEMES and "://" in str(address)


def connect(address: str):
    """A DICOMweb client for ``dicomweb[s]://HOST:PORT/PATH``, credentials from the environment.

    Raises:
        ConfigError: not such an address, credentials written into it, or dicomweb-client is
            not installed (``pip install "medseg[pacs]"``).
    """
    parts = urlsplit(address)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ConfigError("--input", f"{address!r} is not dicomweb://HOST:PORT/PATH or dicomwebs://...")
    if parts.username or parts.password:
        raise ConfigError(
            "--input",
            "credentials in an address end up in shell histories and logs; set MEDSEG_DICOMWEB_USER "
            "and MEDSEG_DICOMWEB_PASSWORD, or MEDSEG_DICOMWEB_TOKEN, instead",
        )
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise ConfigError("--input", 'DICOMweb needs dicomweb-client: pip install "medseg[pacs]"') from None
    session = requests.Session()
    token, user = os.environ.get("MEDSEG_DICOMWEB_TOKEN"), os.environ.get("MEDSEG_DICOMWEB_USER")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, os.environ.get("MEDSEG_DICOMWEB_PASSWORD", ""))
    url = f"{SCHEMES[parts.scheme]}://{parts.netloc}{parts.path.rstrip('/')}"
    return DICOMwebClient(url=url, session=session)


def _retried(what: str, call):
    """``call()``, tried ``ATTEMPTS`` times with a doubling pause; the last error is raised as
    an ``InputError`` naming ``what``."""
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except Exception as exc:  # requests' and the server's errors alike: a network step failed
            last = exc
        if attempt < ATTEMPTS - 1:
            time.sleep(BACKOFF_S * 2**attempt)
    raise InputError(what, f"failed after {ATTEMPTS} tries ({first_line(last)[:160]})")


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _pull(client, spool: Path, study: str | None, series: str | None) -> dict[str, str]:
    """Retrieve every image series of the search into ``spool/STUDY/SERIES/SOP.dcm``; a series
    already complete there (``.complete``) is not fetched again. Returns failures by series."""
    filters = {"SeriesInstanceUID": series} if series else None
    found = _retried("the series search", lambda: client.search_for_series(study, search_filters=filters))
    failed: dict[str, str] = {}
    for item in found:
        study_uid, series_uid = _value(item, _STUDY), _value(item, _SERIES)
        where = f"series {series_uid or '?'}"
        if not (_UID.match(study_uid) and _UID.match(series_uid)):
            failed[where] = "the server gave a study or series UID that is not a DICOM UID"
            continue
        if _value(item, _MODALITY).upper() in NOT_IMAGES:
            continue  # a segmentation, report or other non-image: nothing to segment
        target = spool / study_uid / series_uid
        if (target / ".complete").is_file() or (target / STORED).is_file():
            continue  # fetched already, or its SEG is on the server
        try:
            instances = _retried(where, lambda s=study_uid, r=series_uid: client.retrieve_series(s, r))
        except InputError as exc:
            failed[where] = exc.message
            continue
        target.mkdir(parents=True, exist_ok=True)
        for dataset in instances:
            sop = str(getattr(dataset, "SOPInstanceUID", ""))
            if not _UID.match(sop):
                continue
            with atomic_path(target / f"{sop}.dcm") as tmp:
                dataset.save_as(tmp, enforce_file_format=True)
        (target / ".complete").touch()
    return failed


def predict_dicomweb(
    predictor,
    address: str,
    output_dir: str | Path,
    *,
    study: str | None = None,
    series: str | None = None,
    store_to: str | None = None,
    overwrite: bool = False,
    on_case=None,
) -> BatchResult:
    """Segment the image series of a DICOMweb server and store a DICOM-SEG of each.

    Args:
        predictor: the model.
        address: the server, ``dicomweb://HOST:PORT/PATH``.
        output_dir: the DICOM-SEGs and the run's reports (``predictions.csv``, ``run.json``), as
            ``predict_many`` writes them. The retrieved series wait in ``OUTPUT.spool`` until
            their SEG is stored; a rerun fetches only what is missing.
        study, series: the study to segment (every image series of it), or one series of it;
            neither: every series the server holds.
        store_to: where to store the SEGs (a DICOMweb address); None: the source server.
        overwrite: segment again the series waiting in the spool though masks of them exist.
            Series whose SEG was stored (their ``.stored`` marker) are not fetched again:
            remove ``OUTPUT.spool`` to redo them.

    Returns:
        The batch run's result; series that could not be fetched or stored are in ``failed``.
    """
    output_dir = Path(output_dir)
    spool = output_dir.with_name(output_dir.name + SPOOL_SUFFIX)
    client = connect(address)
    target = connect(store_to) if store_to else client
    pulled_failures = _pull(client, spool, study, series)
    for name, reason in pulled_failures.items():
        log.error("%s: %s", name, reason)
    if not any(spool.rglob("*.dcm")):
        log.info("nothing new to segment: every image series found has its SEG stored")
        return BatchResult(failed=pulled_failures)
    result = predict_many(predictor, spool, output_dir, fmt="dicom-seg", overwrite=overwrite, on_case=on_case)
    result.failed.update(pulled_failures)
    for record in result.records:
        # Written now, or (skipped) written by an earlier run whose store failed: store it.
        if record.get("status") not in ("written", "skipped") or not record.get("output"):
            continue
        segmentation = output_dir / record["output"]
        try:
            stored = _store(target, segmentation)
        except InputError as exc:
            result.failed[str(segmentation)] = exc.message
            record.update(status="failed", reason=exc.message)
            continue
        series_uid = str(stored.ReferencedSeriesSequence[0].SeriesInstanceUID)
        source = spool / str(stored.StudyInstanceUID) / series_uid
        if _UID.match(series_uid) and source.is_dir():  # its images are on the server, its SEG too
            for item in source.glob("*.dcm"):
                item.unlink()
            (source / ".complete").unlink(missing_ok=True)
            (source / STORED).touch()
    return result


def _store(client, segmentation: Path):
    """Store a DICOM-SEG file; returns its dataset."""
    import pydicom

    dataset = pydicom.dcmread(segmentation)
    _retried(f"storing {segmentation.name}", lambda: client.store_instances([dataset]))
    return dataset
