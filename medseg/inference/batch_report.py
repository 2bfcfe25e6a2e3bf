"""The report of a batch run: ``predictions.csv`` and ``run.json``, rewritten atomically as each
case finishes, so a killed run leaves an accurate account of what it did.

``run.json`` also says which checkpoint (SHA-256) and options made the masks in its folder. A
later run trusts a mask only when a report there says it was written by the same checkpoint
with the same options; ``previous_masks`` reads that back.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import InputError
from medseg.io import write_text_atomic

__all__ = ["BatchReport", "PreviousMask", "previous_masks", "report_names"]

STATUSES = ("written", "skipped", "failed")


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
            reports.append((float(data["updated_unix"]), data["identity"], data))
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(
                path, "is not a medseg run report; move it away or choose another --output"
            ) from None
    found: dict[str, PreviousMask] = {}
    for _, identity, data in sorted(reports, key=lambda r: r[0]):
        for record in data.get("cases", []):
            if record.get("output") and record.get("status") in ("written", "skipped"):
                found[record["output"]] = PreviousMask(identity, True, record)
        for mask in data.get("in_progress", []):
            found[mask] = PreviousMask(identity, False, {})
    return found


class BatchReport:
    """The running account of one batch run (or one shard of it).

    Args:
        output_dir: where the masks and the report go.
        identity: what makes two runs' masks the same: checkpoint SHA-256 and mask options.
        info: anything else worth recording (medseg version, input, checkpoint path, shard).
        shard: ``(i, n)`` when this run is one shard; its report files are named after it.
        total: cases in this run (or shard), for the count of pending ones.
    """

    def __init__(
        self, output_dir: str | Path, *, identity: dict, info: dict, shard=None, total: int = 0
    ) -> None:
        csv_name, json_name = report_names(shard)
        self.csv_path, self.json_path = Path(output_dir) / csv_name, Path(output_dir) / json_name
        self.identity, self.info, self.total = identity, info, total
        self.records: list[dict] = []
        self.in_progress: list[str] = []
        self.started = time.time()
        self.finished: float | None = None

    def start(self, mask: str) -> None:
        """Note that ``mask`` is about to be written: if the run dies now, the next run knows
        that a mask there came from this run and may be replaced."""
        self.in_progress.append(mask)
        self._save_json()

    def add(self, record: dict) -> None:
        """Record a finished case: ``input``, ``output``, ``status``, ``reason``, ``seconds`` and
        optionally ``volumes_ml`` / ``mean_intensity`` (label name -> value)."""
        if record["status"] not in STATUSES:
            raise ValueError(f"unknown status {record['status']!r}")
        self.records.append(record)
        if record.get("output") in self.in_progress:
            self.in_progress.remove(record["output"])
        self.save()

    def close(self) -> None:
        """Mark the run as finished and save."""
        self.finished = time.time()
        self.save()

    def counts(self) -> dict[str, int]:
        counts = {s: sum(r["status"] == s for r in self.records) for s in STATUSES}
        counts["pending"] = max(0, self.total - len(self.records))
        return counts

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "failed"]

    def save(self) -> None:
        write_text_atomic(self.csv_path, self._csv())
        self._save_json()

    def _save_json(self) -> None:
        data = {
            "identity": self.identity,
            **self.info,
            "host": platform.node(),
            "started": _iso(self.started),
            "updated": _iso(time.time()),
            "updated_unix": time.time(),
            "finished": _iso(self.finished) if self.finished else None,
            "counts": self.counts(),
            "in_progress": self.in_progress,
            "failed": [{"input": r["input"], "reason": r["reason"]} for r in self.failed],
            "cases": self.records,
        }
        write_text_atomic(self.json_path, json.dumps(data, indent=1) + "\n")

    def _csv(self) -> str:
        volumes = _keys(self.records, "volumes_ml")
        means = _keys(self.records, "mean_intensity")
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            ["input", "output", "status", "reason", "seconds"]
            + [f"{name}_ml" for name in volumes]
            + [f"{name}_mean" for name in means]
        )
        for r in self.records:
            writer.writerow(
                [r["input"], r.get("output", ""), r["status"], r.get("reason", ""), _num(r.get("seconds"))]
                + [_num(r.get("volumes_ml", {}).get(name)) for name in volumes]
                + [_num(r.get("mean_intensity", {}).get(name)) for name in means]
            )
        return out.getvalue()


def _keys(records: list[dict], field: str) -> list[str]:
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record.get(field) or {}))
    return list(names)


def _num(value) -> str:
    return "" if value is None else str(round(value, 3)) if isinstance(value, float) else str(value)


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stamp))
