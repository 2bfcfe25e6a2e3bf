"""The benchmark ledger: one JSON line per finished run, and the results page drawn from it.

``benchmarks/ledger.jsonl`` keeps every finished benchmark run (``kind: "run"``: accuracy at a
fixed number of optimizer steps) and every speed measurement (``kind: "speed"``: seconds per
step of one arm, measured alone and short after a warm-up) with the commit, the CPU and the
threads. Accuracy at a step budget does not depend on what else the machine is doing, so runs
may share the machine; "Dice at 10 CPU-minutes" is the run whose step budget is 600 s of that
arm's measured speed on a machine of that CPU.

    python scripts/ledger.py                      # the tables, as Markdown, to stdout
    python scripts/ledger.py --curves docs/curves_steps.png --data acdc
    python scripts/ledger.py --page docs/performance.md   # redraw the page's ledger block and curves
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "benchmarks" / "ledger.jsonl"


def machine() -> dict:
    """The CPU model, whether it computes bf16 natively, and the commit the code is at."""
    model, flags = platform.processor(), ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": model,
        "bf16": "avx512_bf16" in flags.split() or "amx_bf16" in flags.split(),
        "cores": os.cpu_count(),
        "commit": commit,
    }


def append(record: dict, path: Path = LEDGER) -> None:
    """Add one line to the ledger (created with its folder if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read(path: Path = LEDGER) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def arm_name(record: dict) -> str:
    """An arm's name: ``medseg`` or ``monai``, with its overrides."""
    overrides = record.get("overrides") or ""
    return f"{record['arm']} {overrides}".strip()


def _mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def minutes(records: list[dict], run: dict) -> str:
    """A run's step budget in minutes of training alone, at the latest speed the ledger holds
    for that arm on that data and CPU ('-' when it holds none)."""
    same = [
        r
        for r in records
        if r.get("kind") == "speed"
        and (r["data"], arm_name(r), r["cpu"], r["bf16"])
        == (run["data"], arm_name(run), run["cpu"], run["bf16"])
    ]
    return f"{run['steps_budget'] * same[-1]['seconds_per_step'] / 60:.1f}" if same else "-"


# Commits that changed what a run trains (medseg's defaults, or the MONAI script): the runs of
# one arm from such a commit up to the next share a recipe, and their seeds pool in one row.
# A change to the recipe adds its commit here.
RECIPES = ["d575b9f", "d0b7a59", "1190018"]


@functools.cache
def recipe(commit: str) -> str:
    """The newest commit of ``RECIPES`` at or before ``commit``; the commit itself otherwise."""
    commit = commit.removesuffix("-dirty")
    for candidate in reversed(RECIPES):
        if candidate == commit:
            return candidate
        ancestor = subprocess.run(
            ["git", "merge-base", "--is-ancestor", candidate, commit], cwd=ROOT, capture_output=True
        )
        if ancestor.returncode == 0:
            return candidate
    return commit


def table(records: list[dict], data: str | None = None) -> str:
    """Mean Dice ± std over seeds per data set, arm, recipe and step budget, with each seed's figure."""
    groups = defaultdict(list)
    for r in records:
        if r.get("kind") == "run" and (data is None or r["data"] == data):
            groups[(r["data"], r["steps_budget"], recipe(r["commit"]), arm_name(r))].append(r)
    lines = [
        "| data | steps | minutes alone | recipe of | arm | seeds | mean Dice | per seed | worst case "
        "| per class |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, steps, commit, arm), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        classes = [k for k in runs[0] if k.startswith("dice_") and k not in ("dice_mean", "dice_worst_case")]
        seeds = ", ".join(f"{r['dice_mean']:.3f}" for r in runs)
        per_class = " / ".join(f"{k[5:]} {_mean_spread([r[k] for r in runs])}" for k in classes)
        mean, worst = (_mean_spread([r[k] for r in runs]) for k in ("dice_mean", "dice_worst_case"))
        cells = [
            dataset,
            steps,
            minutes(records, runs[0]),
            commit,
            f"`{arm}`",
            len(runs),
            mean,
            seeds,
            worst,
            per_class,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def speeds(records: list[dict]) -> str:
    """Seconds per step of each arm, per data set and CPU."""
    lines = [
        "| data | commit | arm | CPU (bf16) | threads | s/step | steps in 600 s | waiting for data |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("kind") == "speed":
            cpu = f"{r['cpu']} ({'yes' if r['bf16'] else 'no'})"
            per_step = r["seconds_per_step"]
            cells = [
                r["data"],
                r["commit"],
                f"`{arm_name(r)}`",
                cpu,
                r["threads"],
                f"{per_step:.3f}",
                f"{600 / per_step:.0f}",
                f"{r['data_wait']:.0%}" if "data_wait" in r else "",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot_curves(records: list[dict], data: str, path: Path) -> None:
    """Mean Dice against optimizer steps, one line per arm and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for r in records:
        if r.get("kind") != "run" or r["data"] != data or not r.get("curve"):
            continue
        arm = arm_name(r)
        first = arm not in colours
        colours.setdefault(arm, f"C{len(colours) % 10}")
        points = sorted((int(s), d) for s, d in r["curve"].items())
        ax.plot(*zip(*points), "o-", color=colours[arm], alpha=0.8, label=arm[:70] if first else None)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("mean foreground Dice, held-out cases")
    ax.set_title(data)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BEGIN, END = "<!-- ledger: drawn by scripts/ledger.py --page; do not edit -->", "<!-- ledger end -->"


def write_page(records: list[dict], page: Path) -> None:
    """Replace the block between the page's ledger markers with the tables, and draw each data
    set's learning curves beside the page (``curves_steps_DATA.png``)."""
    text = page.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page}: no ledger block (the lines {BEGIN!r} and {END!r})")
    parts = ["**Seconds per step** (each arm alone, short, after a warm-up):", "", speeds(records), ""]
    for data in sorted({r["data"] for r in records if r.get("kind") == "run"}):
        picture = page.parent / f"curves_steps_{data}.png"
        plot_curves(records, data, picture)
        parts += [
            f"**{data}**",
            "",
            table(records, data),
            "",
            f"![{data}: Dice against steps]({picture.name})",
            "",
        ]
    head, rest = text.split(BEGIN, 1)
    page.write_text(head + BEGIN + "\n" + "\n".join(parts) + END + rest.split(END, 1)[1], encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ledger", type=Path, default=LEDGER)
    parser.add_argument("--data", help="only this data set (its folder's name)")
    parser.add_argument("--curves", type=Path, help="draw the learning curves of --data to this PNG")
    parser.add_argument("--page", type=Path, help="redraw this page's ledger block and its curves")
    args = parser.parse_args()
    records = read(args.ledger)
    if args.page:
        write_page(records, args.page)
        return
    if args.curves:
        plot_curves(records, args.data, args.curves)
        return
    print(table(records, args.data))
    print()
    print(speeds(records))


if __name__ == "__main__":
    main()
