"""Does diffusion pretraining help when labels are few? Scratch against pretrained, side by side.

Generates phantoms (a pool of labelled cases, unlabelled ones, and a fixed test set), pretrains
once on every non-test image (``medseg pretrain``'s ``Pretrainer``), then for each seed and each
number of labelled cases trains two arms for the same number of steps from the same seed and
cases: from scratch, and from the pretrained weights (``train.init``). Both are scored on the
same test cases; the table gives mean foreground Dice +- std over the seeds.

    python scripts/label_efficiency.py --sizes 2,4,8 --seeds 3
    python scripts/label_efficiency.py --sizes 2 --seeds 1 --finetune-steps 100   # a quick look
    python scripts/label_efficiency.py --data ../shared/realdata/la --test 16 --sizes 8 \
        --pretrain-steps 2000 --finetune-steps 1500 --work le_la              # real scans

With ``--data`` (an nnU-Net or MSD folder) the cases are real: scored on the set's own labelled
test cases (``imagesTs``) or, without them, on ``--test`` training cases held out by a seeded
draw (the benchmark's split); the labelled cases are drawn from the others by patient (the part
of a case's name before its first ``_``: ACDC's two phases of a patient go together, so
``--sizes 3`` is 3 patients, 6 volumes), and pretraining sees every image but the test ones.

``--report`` trains nothing and writes the table (``results.md``) and a picture of Dice against
labelled cases (``results.png``) from the finished runs.

Steps, not seconds, fix the budgets, so another job on the machine slows the study but does not
change its result. Run again with the same ``--work`` to resume: finished runs are kept (delete
``runs/`` to redo them with other settings).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import make_phantoms, real_data  # noqa: E402

from medseg.atomic import write_text_atomic  # noqa: E402
from medseg.config import load_config  # noqa: E402
from medseg.evaluation.folders import evaluate  # noqa: E402
from medseg.inference.batch import predict_many  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.training.pretrain import Pretrainer  # noqa: E402
from medseg.training.trainer import Trainer  # noqa: E402
from medseg.training.transfer import PARTS  # noqa: E402

EPOCH = 25  # steps per epoch
ARMS = ("scratch", "pretrained", "meanteacher", "selftrain", "selftrain2", "mtselftrain")
# self-training arm -> the arm whose model labels its unlabelled images
LABELLER = {"selftrain": "scratch", "selftrain2": "selftrain", "mtselftrain": "meanteacher"}


def _overrides(args, steps: int) -> list[str]:
    return [
        f"model.name={args.model}",
        f"train.epochs={max(1, steps // EPOCH)}",
        f"train.iters_per_epoch={min(EPOCH, steps)}",
        *[o for o in args.set.split(";") if o],
    ]


def pretrain(args, images: list[Path], work: Path) -> Path:
    """Pretrain once on the pool's and the unlabelled cases' images (never the test images)."""
    checkpoint = work / "pretrain" / "last.pt"
    if checkpoint.is_file():
        return checkpoint
    manifest = work / "pretrain_images.csv"
    manifest.write_text("image\n" + "".join(f"{p}\n" for p in images))
    extra = [o for o in args.pretrain_set.split(";") if o]
    config = load_config(None, _overrides(args, args.pretrain_steps) + extra)
    config.data.root, config.train.output_dir = str(manifest), str(work / "pretrain")
    start = time.monotonic()
    Pretrainer(config, overwrite=True).fit()
    print(
        f"pretrained {args.pretrain_steps} steps on {len(images)} images in {time.monotonic() - start:.0f} s",
        flush=True,
    )
    return checkpoint


class Freeze:
    """A callback that keeps some modules at their starting weights (``parts``: top-level module
    names), random or pretrained: do the pretrained features beat random ones?"""

    def __init__(self, parts: set[str]):
        self.parts = parts

    def on_train_start(self, trainer: Trainer) -> None:
        for name, parameter in trainer.model.named_parameters():
            if name.split(".")[0] in self.parts:
                parameter.requires_grad_(False)  # AdamW skips what gets no gradient


def finetune(
    args,
    data: Path,
    cases: list[dict],
    init: Path | None,
    seed: int,
    run: Path,
    plan: Path,
    unlabeled: list[str] = (),
    labeller: Path | None = None,
) -> dict:
    """Train on ``cases`` (no validation: a fixed number of steps) and score the test set.

    Every arm uses the pretraining's plan (planned on all the images), so that only the starting
    weights differ: planned on two cases, the scratch arm would get another spacing and patch.
    With ``unlabeled`` images the run learns from them too (``train.unlabeled``): by the mean
    teacher, or with a ``labeller`` by self-training (``train.pseudo_labels``: that model labels
    them, then the run trains on them and the labelled cases alike; its seconds include the
    labelling).
    """
    config = load_config(None, _overrides(args, args.finetune_steps) + [f"train.seed={seed}"])
    config.train.output_dir = str(run)
    if unlabeled:
        run.mkdir(parents=True, exist_ok=True)
        manifest = run / "unlabeled.csv"
        manifest.write_text("image\n" + "".join(f"{p}\n" for p in unlabeled))
        config.train.unlabeled = str(manifest)
        config.train.pseudo_labels = str(labeller) if labeller else None
    if init is None:
        config.data.plan = str(plan)
    else:
        config.train.init = str(init)
        config.train.init_parts = args.init_parts
        if args.init_lr:
            config.train.lr = args.init_lr
    start = time.monotonic()
    callbacks = [Freeze(PARTS[args.init_parts])] if args.freeze else []
    summary = Trainer(config, overwrite=True, train_cases=cases, val_cases=[], callbacks=callbacks).fit()
    seconds = time.monotonic() - start
    masks = run / "masks"
    shutil.rmtree(masks, ignore_errors=True)
    predict_many(Predictor(summary["best"], device="cpu"), data / "imagesTs", masks)
    scores = evaluate(masks, data / "labelsTs", out=run / "test", overwrite=True)
    return {"dice": scores["mean_foreground"], "per_class": scores["mean"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="2,4,8", help="labelled cases per arm, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--seed-start", type=int, default=0, help="first seed (two processes can share a study)"
    )
    parser.add_argument("--pool", type=int, default=8, help="labelled cases to draw the subsets from")
    parser.add_argument("--unlabeled", type=int, default=24)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument(
        "--variety", type=float, default=1.0, help="how much the phantoms differ (make_phantom's; 3: hard)"
    )
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--init-parts", default="encoder")
    parser.add_argument(
        "--init-lr", type=float, help="learning rate of the pretrained arm (default: the same)"
    )
    parser.add_argument("--set", default="", help="extra overrides for both arms, ';'-separated")
    parser.add_argument("--pretrain-set", default="", help="extra overrides for pretraining, ';'-separated")
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="keep the --init-parts weights fixed in both arms (random or pretrained); "
        "--init-parts all: only the output head learns (a linear probe)",
    )
    parser.add_argument(
        "--arms",
        default="scratch,pretrained",
        help="which arms to train: scratch, pretrained, meanteacher (scratch plus the other "
        "training images unlabelled, train.unlabeled), selftrain (a new network on the labelled "
        "cases and the others labelled by the scratch arm's model; run scratch first), selftrain2 "
        "(the same, labelled by the selftrain arm's model: a second round), mtselftrain (the same, "
        "labelled by the meanteacher arm's model)",
    )
    parser.add_argument(
        "--report", action="store_true", help="train nothing: the table and picture of the finished runs"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", help="a real dataset folder (nnU-Net or MSD); default: phantoms")
    parser.add_argument("--work", default="label_efficiency_work")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.data:
        data = real_data(Path(args.data), work / "data", args.test)
        pool = [
            {"image": c["image"], "label": c["label"], "id": Path(c["label"]).name.split(".")[0]}
            for c in json.loads((data / "dataset.json").read_text())["training"]
        ]
    else:
        data = make_phantoms(
            work / "data", n_train=args.pool + args.unlabeled, n_test=args.test, variety=args.variety
        )
        pool = [
            {"image": str(p), "label": str(data / "labelsTr" / p.name), "id": p.name}
            for p in sorted((data / "imagesTr").iterdir())
        ]
    pool_all = list(pool)  # every non-test image: what is not labelled in an arm is unlabelled
    images = [Path(c["image"]) for c in pool]
    checkpoint = work / "pretrain" / "last.pt" if args.report else pretrain(args, images, work)
    if not args.data:
        pool = pool[: args.pool]  # the labelled cases are drawn from the first few; all pretrain
    patients: dict[str, list[dict]] = {}
    for case in pool:
        patients.setdefault(case["id"].split("_")[0] if args.data else case["id"], []).append(case)
    groups = [patients[k] for k in sorted(patients)]

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        rng = np.random.default_rng(seed)
        for size in sizes:  # drawn in the order given: keep --sizes' order when resuming
            picked = sorted(rng.choice(len(groups), size, replace=False))
            cases = [case for i in picked for case in groups[i]]
            arms = {**dict.fromkeys(ARMS), "pretrained": checkpoint}  # arm -> its starting weights
            chosen = {c["image"] for c in cases}
            rest = [c["image"] for c in pool_all if c["image"] not in chosen]  # unlabelled here
            for arm, init in ((a, arms[a]) for a in args.arms.split(",")):
                run = work / "runs" / f"{arm}_n{size}_s{seed}"
                done = run / "result.json"  # a finished run is kept: the study resumes
                if args.report and not done.is_file():
                    continue
                if done.is_file():
                    result = json.loads(done.read_text())
                else:
                    plan = checkpoint.parent / "plan.yaml"
                    if arm in LABELLER:
                        teacher = work / "runs" / f"{LABELLER[arm]}_n{size}_s{seed}" / "best.pt"
                        if not teacher.is_file():
                            raise SystemExit(f"{arm} needs the {LABELLER[arm]} arm's run first: {teacher}")
                        result = finetune(args, data, cases, None, seed, run, plan, rest, teacher)
                    else:
                        extra = rest if arm == "meanteacher" else []
                        result = finetune(args, data, cases, init, seed, run, plan, extra)
                    write_text_atomic(done, json.dumps(result))
                rows.append({"arm": arm, "labelled": size, "seed": seed, **result})
                print(
                    f"seed {seed}, {size} labelled, {arm}: "
                    f"Dice {result['dice']:.3f} ({result['seconds']:.0f} s)",
                    flush=True,
                )
    _report(rows, sizes, work, args)


def _report(rows: list[dict], sizes: list[int], work: Path, args) -> None:
    with open(work / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "labelled", "seed", "dice", "seconds"])
        writer.writerows(
            [r["arm"], r["labelled"], r["seed"], f"{r['dice']:.4f}", f"{r['seconds']:.0f}"] for r in rows
        )
    (work / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    others = [a for a in arms if a != "scratch"] if "scratch" in arms else []
    header = ["labelled cases", *arms, *(f"{a} - scratch" for a in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def spread(values: list[float], signed: str = "") -> str:
        if not values:
            return ""
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{signed}.3f} ± {sd:.3f} (n={len(values)})"

    for size in sizes:
        dice = {
            a: {r["seed"]: r["dice"] for r in rows if r["labelled"] == size and r["arm"] == a} for a in arms
        }
        cells = [spread(list(dice[a].values())) for a in arms]
        for a in others:  # paired by seed: the same labelled cases
            seeds = sorted(set(dice[a]) & set(dice["scratch"]))
            gains = [dice[a][k] - dice["scratch"][k] for k in seeds]
            cells.append(spread(gains, "+"))
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (work / "results.md").write_text(table + "\n")
    print(table)
    _plot(rows, arms, work / "results.png", args)


def _plot(rows: list[dict], arms: list[str], path: Path, args) -> None:
    """Dice against labelled cases: a dot per seed, a line through each arm's means, and a thin
    grey line joining one labelled set's arms (the comparison is paired)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = dict(zip(ARMS, ("0.3", "C0", "C1", "C2", "C3", "C4")))
    sizes = sorted({r["labelled"] for r in rows})
    shifts = {arm: 0.1 * (k - (len(arms) - 1) / 2) for k, arm in enumerate(arms)}  # side by side
    for size, seed in {(r["labelled"], r["seed"]) for r in rows}:
        paired = [
            r for arm in arms for r in rows if (r["arm"], r["labelled"], r["seed"]) == (arm, size, seed)
        ]
        x = [sizes.index(size) + shifts[r["arm"]] for r in paired]
        ax.plot(x, [r["dice"] for r in paired], color="0.8", linewidth=0.8, zorder=0)
    for arm in arms:
        shift = shifts[arm]
        found = [(sizes.index(r["labelled"]) + shift, r["dice"]) for r in rows if r["arm"] == arm]
        ax.scatter(*zip(*found), color=colours[arm], alpha=0.5, s=16)
        means = sorted((x, statistics.mean(d for y, d in found if y == x)) for x in {x for x, _ in found})
        ax.plot(*zip(*means), "o-", color=colours[arm], label=arm, markersize=7)
    ax.set_xticks(range(len(sizes)), [str(n) for n in sizes])
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_xlabel("labelled cases (patients)" if args.data else "labelled cases")
    ax.set_ylabel("mean foreground Dice, held-out cases")
    ax.set_title(f"{Path(args.data).name if args.data else 'phantoms'}, {args.finetune_steps} steps per run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
