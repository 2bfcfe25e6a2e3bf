"""The report of a batch run: ``predictions.csv`` (a row per case, appended and flushed to disk
as each case finishes) and ``run.json`` (the run: identity, counts, failures, the case being
written; rewritten atomically), so a killed run leaves an accurate account of what it did.

``run.json`` says which checkpoint (SHA-256) and options made the masks of its CSV. A later run
trusts a mask only when a report there says it was written by the same checkpoint with the same
options; ``previous_masks`` reads that back. Both files stay cheap to update however many cases
a run has.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.atomic import write_text_atomic
from medseg.errors import InputError

__all__ = ["BatchReport", "PreviousMask", "previous_masks", "report_names"]

STATUSES = ("written", "skipped", "failed")
_FIXED = ["input", "output", "status", "reason", "seconds"]


def report_names(shard: tuple[int, int] | None = None) -> tuple[str, str]:
    """The CSV and JSON names of a run's report; each shard has its own pair."""
    tag = f".shard-{shard[0]}-of-{shard[1]}" if shard and shard[1] > 1 else ""
    return f"predictions{tag}.csv", f"run{tag}.json"


@dataclass(frozen=True)
class PreviousMask:
    """What an earlier report says about a mask: the identity of the run that made it, whether
    it finished (``written``) or was being written when the run stopped, and its record."""

    identity: dict
    finished: bool
    record: dict


def previous_masks(output_dir: str | Path) -> dict[str, PreviousMask]:
    """Mask path (relative) -> what the reports in ``output_dir`` say about it; a later report
    (by ``updated`` time) wins over an earlier one.

    Raises:
        InputError: a ``run*.json`` there is not a medseg run report.
    """
    reports = []
    for path in sorted(Path(output_dir).glob("run*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            reports.append(
                (float(data["updated_unix"]), data["identity"], data, path.parent / data["report"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(
                path, "is not a medseg run report; move it away or choose another --output"
            ) from None
    found: dict[str, PreviousMask] = {}
    for _, identity, data, table in sorted(reports, key=lambda r: r[0]):
        for mask in data.get("in_progress", []):
            found[mask] = PreviousMask(identity, False, {})
        # A row is appended only once its mask is in place, so it outweighs an in-progress note
        # that a kill kept from being cleared.
        for record in read_records(table):
            if record["output"] and record["status"] in ("written", "skipped"):
                found[record["output"]] = PreviousMask(identity, True, record)
    return found


def read_records(table: Path) -> list[dict]:
    """The case records of a ``predictions*.csv`` (a row cut short by a crash is left out)."""
    if not table.is_file():
        return []
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    records = []
    for row in rows:
        if row.get("status") not in STATUSES or None in row.values():
            continue
        record = {key: row[key] for key in _FIXED}
        for suffix, field in (("_ml", "volumes_ml"), ("_cm2", "volumes_ml"), ("_mean", "mean_intensity")):
            values = {k[: -len(suffix)]: float(v) for k, v in row.items() if k.endswith(suffix) and v}
            if values:
                record[field] = values
        if row.get("uncertainty"):
            record["uncertainty"] = float(row["uncertainty"])
        records.append(record)
    return records


class BatchReport:
    """The running account of one batch run (or one shard of it).

    Args:
        output_dir: where the masks and the report go.
        identity: what makes two runs' masks the same: checkpoint SHA-256 and mask options.
        info: anything else worth recording (medseg version, input, checkpoint path, shard).
        labels: the label names that get a volume column (and a mean column with ``statistics``).
        size_column: the volume columns' suffix: ``ml``, or ``cm2`` for the areas of 2D images
            (``medseg.evaluation.metrics.volume_unit``).
        statistics: whether records carry the mean intensity per label.
        uncertainty: whether records carry the mean uncertainty inside the labels.
        shard: ``(i, n)`` when this run is one shard; its report files are named after it.
        total: cases in this run (or shard), for the count of pending ones.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        identity: dict,
        info: dict,
        labels: list[str],
        statistics: bool = False,
        uncertainty: bool = False,
        shard=None,
        total: int = 0,
        size_column: str = "ml",
    ) -> None:
        csv_name, json_name = report_names(shard)
        self.csv_path, self.json_path = Path(output_dir) / csv_name, Path(output_dir) / json_name
        self.identity, self.info, self.total = identity, info, total
        self.labels, self.statistics, self.uncertainty = list(labels), statistics, uncertainty
        self.records: list[dict] = []
        self.in_progress: list[str] = []
        self.started = time.time()
        self.finished: float | None = None
        header = (
            _FIXED
            + [f"{n}_{size_column}" for n in self.labels]
            + [f"{n}_mean" for n in self.labels if statistics]
        )
        header += ["uncertainty"] if uncertainty else []
        write_text_atomic(self.csv_path, _line(header))
        self._save_json()

    def start(self, mask: str) -> None:
        """Note that ``mask`` is about to be written: if the run dies now, the next run knows
        that a mask there came from this run and may be replaced."""
        self.in_progress.append(mask)
        self._save_json()

    def add(self, record: dict) -> None:
        """Record a finished case: ``input``, ``output``, ``status``, ``reason``, ``seconds`` and
        optionally ``volumes_ml`` / ``mean_intensity`` (label name -> value) and ``uncertainty``."""
        if record["status"] not in STATUSES:
            raise ValueError(f"unknown status {record['status']!r}")
        self.records.append(record)
        volumes, means = record.get("volumes_ml") or {}, record.get("mean_intensity") or {}
        row = [record["input"], record.get("output", ""), record["status"], record.get("reason", "")]
        row += [_num(record.get("seconds"))] + [_num(volumes.get(n)) for n in self.labels]
        row += [_num(means.get(n)) for n in self.labels] if self.statistics else []
        spread = record.get("uncertainty")
        row += ["" if spread is None else f"{spread:.4g}"] if self.uncertainty else []
        with self.csv_path.open("a", encoding="utf-8") as handle:
            handle.write(_line(row))
            handle.flush()
            os.fsync(handle.fileno())
        if record.get("output") in self.in_progress:
            self.in_progress.remove(record["output"])
        self._save_json()

    def close(self) -> None:
        """Mark the run as finished."""
        self.finished = time.time()
        self._save_json()

    def counts(self) -> dict[str, int]:
        counts = {s: sum(r["status"] == s for r in self.records) for s in STATUSES}
        counts["pending"] = max(0, self.total - len(self.records))
        return counts

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "failed"]

    def _save_json(self) -> None:
        now = time.time()
        data = {
            "identity": self.identity,
            "report": self.csv_path.name,
            **self.info,
            "host": platform.node(),
            "started": _iso(self.started),
            "updated": _iso(now),
            "updated_unix": now,
            "finished": _iso(self.finished) if self.finished else None,
            "counts": self.counts(),
            "in_progress": self.in_progress,
            "failed": [{"input": r["input"], "reason": r["reason"]} for r in self.failed],
        }
        write_text_atomic(self.json_path, json.dumps(data, indent=1) + "\n")


def _line(cells: list) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


def _num(value) -> str:
    return "" if value is None else str(round(value, 3)) if isinstance(value, float) else str(value)


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stamp))
