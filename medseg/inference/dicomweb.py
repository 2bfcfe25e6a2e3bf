"""Segment series straight from a PACS over DICOMweb: search the series (QIDO-RS), retrieve each
into a spool folder (WADO-RS), segment them with the batch run (its per-case failures, reports
and reruns), and store each DICOM-SEG back (STOW-RS). A series whose SEG this model already
stored is found by asking the server, not a local file, and skipped. The client is
``dicomweb-client``.

Addresses are ``dicomweb://HOST:PORT/PATH`` (http) or ``dicomwebs://...`` (https, TLS).
Credentials come from the environment, never from the command line, and are never logged:
``MEDSEG_DICOMWEB_TOKEN`` (a bearer token), or ``MEDSEG_DICOMWEB_USER`` with
``MEDSEG_DICOMWEB_PASSWORD``. Files are named by UID only, never by a patient's name or ID.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

from medseg.atomic import atomic_path, write_text_atomic
from medseg.dicom import NON_IMAGE_MODALITIES, SHA256_PARAMETER
from medseg.errors import ConfigError, InputError, first_line
from medseg.inference.batch import BatchResult, predict_many

__all__ = [
    "is_dicomweb",
    "connect",
    "parse_query",
    "predict_dicomweb",
    "retried",
    "SPOOL_SUFFIX",
    "STORED_REPORT",
]

log = logging.getLogger(__name__)

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
SPOOL_SUFFIX = ".spool"  # the retrieved series wait beside the output folder, in OUTPUT.spool
STORED_REPORT = "stored.json"  # in the output folder: each series' SEG, stored or why not
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # what DICOM allows in a UID: safe as a file name
ATTEMPTS, BACKOFF_S = 3, 1.0  # network calls are retried with a doubling pause, then reported
_STUDY, _SERIES, _MODALITY, _SOP = "0020000D", "0020000E", "00080060", "00080018"
# A SEG's referenced series, and its segments' algorithm and the algorithm's parameters.
_REFERENCED, _SEGMENTS, _ALGORITHM, _PARAMETERS = "00081115", "00620002", "00620007", "00660032"


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
    client = DICOMwebClient(url=url, session=session)
    # Ours are the only retries (retried: 3 tries, 1 s and 2 s apart). The client's own (5 tries
    # up to 16 s apart, on refused connections too) made each call to a stopped server take 30 s
    # before ours began, 90 s in all.
    client.set_http_retry_params(retry=False)
    return client


def retried(what: str, call):
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


def _first(item: dict, tag: str) -> dict:
    """The first item of a sequence in DICOM JSON ({} when absent)."""
    values = item.get(tag, {}).get("Value") or [{}]
    return values[0] if isinstance(values[0], dict) else {}


def _segmented_by(target, study_uid: str, sha256: str) -> set[str]:
    """The series of a study for which ``target`` holds a SEG this model made: each SEG's
    referenced series, where its algorithm's parameters name the model's SHA-256."""
    mark = f"{SHA256_PARAMETER}={sha256}"
    segs = retried(
        f"the SEG search of study {study_uid}",
        lambda: target.search_for_instances(study_uid, search_filters={"Modality": "SEG"}),
    )
    done = set()
    for item in segs:
        series_uid, sop = _value(item, _SERIES), _value(item, _SOP)
        meta = retried(
            f"SEG {sop}", lambda r=series_uid, o=sop: target.retrieve_instance_metadata(study_uid, r, o)
        )
        parameters = _value(_first(_first(meta, _SEGMENTS), _ALGORITHM), _PARAMETERS)
        if mark in parameters.split(","):
            done.add(_value(_first(meta, _REFERENCED), _SERIES))
    return done


def parse_query(text: str) -> dict[str, str]:
    """``--query "Modality=MR&StudyDate=20260101-"``: QIDO-RS search filters, each a DICOM
    keyword and a value (a date range, a ``*`` wildcard and a UID list work as the server's
    QIDO-RS allows).

    Raises:
        ConfigError: a part is not ``KEYWORD=VALUE`` or names no DICOM keyword.
    """
    from pydicom.datadict import tag_for_keyword

    filters = {}
    for part in text.split("&"):
        keyword, equals, value = part.partition("=")
        if not equals or not value:
            raise ConfigError("--query", f"{part!r} is not KEYWORD=VALUE (parts joined by &)")
        if tag_for_keyword(keyword.strip()) is None:
            raise ConfigError("--query", f"{keyword.strip()!r} is not a DICOM keyword, like StudyDate")
        filters[keyword.strip()] = value.strip()
    return filters


def _pull(client, target, sha256: str, spool: Path, study, series, query: dict) -> dict[str, str]:
    """Retrieve every image series of the search into ``spool/STUDY/SERIES/SOP.dcm``, but those
    whose SEG by this model ``target`` holds; a series already complete in the spool
    (``.complete``) is not fetched again. Returns failures by series."""
    filters = {**query, **({"SeriesInstanceUID": series} if series else {})} or None
    found = retried("the series search", lambda: client.search_for_series(study, search_filters=filters))
    failed: dict[str, str] = {}
    segmented: dict[str, set[str]] = {}  # by study, asked once
    for item in found:
        study_uid, series_uid = _value(item, _STUDY), _value(item, _SERIES)
        where = f"series {series_uid or '?'}"
        if not (_UID.match(study_uid) and _UID.match(series_uid)):
            failed[where] = "the server gave a study or series UID that is not a DICOM UID"
            continue
        modality = _value(item, _MODALITY).upper()
        if modality in NON_IMAGE_MODALITIES:  # a segmentation, report or other non-image
            log.info("%s: %s, not an image: left alone", where, modality)
            continue
        folder = spool / study_uid / series_uid
        if (folder / ".complete").is_file():
            continue  # fetched already
        try:
            if study_uid not in segmented:
                segmented[study_uid] = _segmented_by(target, study_uid, sha256)
        except InputError as exc:
            failed[where] = exc.message
            continue
        if series_uid in segmented[study_uid]:
            continue  # its SEG by this model is on the server
        try:
            instances = retried(where, lambda s=study_uid, r=series_uid: client.retrieve_series(s, r))
        except InputError as exc:
            failed[where] = exc.message
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for dataset in instances:
            sop = str(getattr(dataset, "SOPInstanceUID", ""))
            if not _UID.match(sop):
                continue
            with atomic_path(folder / f"{sop}.dcm") as tmp:
                dataset.save_as(tmp, enforce_file_format=True)
        (folder / ".complete").touch()
    return failed


def predict_dicomweb(
    predictor,
    address: str,
    output_dir: str | Path,
    *,
    study: str | None = None,
    series: str | None = None,
    query: str | dict | None = None,
    store_to: str | None = None,
    overwrite: bool = False,
    statistics: bool = False,
    preview: bool = False,
    on_case=None,
) -> BatchResult:
    """Segment the image series of a DICOMweb server and store a DICOM-SEG of each.

    Args:
        predictor: the model.
        address: the server, ``dicomweb://HOST:PORT/PATH``.
        output_dir: the DICOM-SEGs and the run's reports (``predictions.csv``, ``run.json``), as
            ``predict_many`` writes them, and ``stored.json``: by series UID, its study, the SOP
            instance UIDs of its images, its SEG's file and SOP instance UID, and whether the
            server took it (``stored``) or not (``failed``, with the reason); kept across runs.
            The retrieved series wait in ``OUTPUT.spool`` until their SEG is stored; a rerun
            fetches only what is missing. A series for which the store server holds a SEG by
            this model (its SHA-256 among the SEG's algorithm parameters) is skipped, whatever
            the spool holds.
        study, series: the study to segment (every image series of it), or one series of it;
            neither: every series the server holds.
        query: QIDO-RS filters on the series searched, as ``parse_query`` reads them
            (``"Modality=MR&StudyDate=20260101-"``) or as a dict: many studies at once.
        store_to: where to store the SEGs (a DICOMweb address); None: the source server.
        overwrite: segment again the series waiting in the spool though masks of them exist.
            Series whose SEG by this model is on the server are not fetched again: delete the
            SEG there to redo one.
        statistics, preview, on_case: as for ``predict_many``.

    Returns:
        The batch run's result; series that could not be fetched or stored are in ``failed``.
    """
    output_dir = Path(output_dir)
    spool = output_dir.with_name(output_dir.name + SPOOL_SUFFIX)
    client = connect(address)
    target = connect(store_to) if store_to else client
    query = parse_query(query) if isinstance(query, str) else dict(query or {})
    pulled_failures = _pull(client, target, predictor.sha256, spool, study, series, query)
    for name, reason in pulled_failures.items():
        log.error("%s: %s", name, reason)
    if not any(spool.rglob("*.dcm")):
        log.info("nothing new to segment: every image series found has its SEG by this model stored")
        return BatchResult(failed=pulled_failures)
    result = predict_many(
        predictor,
        spool,
        output_dir,
        fmt="dicom-seg",
        overwrite=overwrite,
        statistics=statistics,
        preview=preview,
        on_case=on_case,
    )
    result.failed.update(pulled_failures)
    stores = _read_stores(output_dir)
    for record in result.records:
        # Written now, or (skipped) written by an earlier run whose store failed: store it.
        if record.get("status") not in ("written", "skipped") or not record.get("output"):
            continue
        segmentation = output_dir / record["output"]
        entry = _store(target, segmentation)
        series_uid = entry["series"]
        stores[series_uid] = entry
        write_text_atomic(output_dir / STORED_REPORT, json.dumps(stores, indent=1) + "\n")
        if entry["status"] == "failed":
            result.failed[str(segmentation)] = entry["reason"]
            record.update(status="failed", reason=entry["reason"])
            continue
        source = spool / entry["study"] / series_uid
        if _UID.match(series_uid) and source.is_dir():  # its images are on the server, its SEG too
            shutil.rmtree(source)
    return result


def _read_stores(output_dir: Path) -> dict:
    """What earlier runs stored, from ``stored.json`` ({} when there is none or it is unreadable:
    it is an account, and the server, not this file, decides what is done)."""
    try:
        found = json.loads((output_dir / STORED_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _store(client, segmentation: Path) -> dict:
    """Store a DICOM-SEG file; returns the account of it for ``stored.json``."""
    import pydicom

    dataset = pydicom.dcmread(segmentation)
    source = dataset.ReferencedSeriesSequence[0]
    entry = {
        "study": str(dataset.StudyInstanceUID),
        "series": str(source.SeriesInstanceUID),
        "instances": [str(i.ReferencedSOPInstanceUID) for i in source.ReferencedInstanceSequence],
        "seg": segmentation.name,
        "seg_sop_instance_uid": str(dataset.SOPInstanceUID),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        retried(f"storing {segmentation.name}", lambda: client.store_instances([dataset]))
    except InputError as exc:
        return {**entry, "status": "failed", "reason": exc.message}
    return {**entry, "status": "stored"}
