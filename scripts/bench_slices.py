"""Training-step cost of a 2D plan against the slices a volume draws, side by side in one process.

    python scripts/bench_slices.py --run RUN_DIR [--slices 6,12] [--rounds 3] [--steps 5]

Builds the run's network from its ``plan.yaml`` and ``config.yaml`` and times forward, loss,
backward and an optimiser step on random patches of 2 volumes x n slices, the slice counts
alternated round by round, so the ratios hold while the machine's own speed drifts. The
planner's ``SLICE_COST_FP32_CPU`` comes from this (docs/performance.md, ACDC).
"""

import argparse
import time
from pathlib import Path

import torch

from medseg.config import load_config
from medseg.data.plan import load_plan
from medseg.models.factory import model_for_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder of a 2D plan (plan.yaml, config.yaml)")
    parser.add_argument("--slices", default="6,12")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan, config = load_plan(Path(args.run) / "plan.yaml"), load_config(Path(args.run) / "config.yaml")
    if plan.slice_axis is None:
        raise SystemExit(f"{args.run}: its plan is 3D; this times 2D plans")
    model = model_for_plan(config, plan, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    counts = [int(n) for n in args.slices.split(",")]

    def step(n: int) -> None:
        shape = list(plan.patch_size)
        shape[plan.slice_axis] = n
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(2, plan.channels, *shape)), torch.randint(0, 4, (2, *shape))
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for n in counts:  # warm-up: the allocator and oneDNN's kernels
        step(n)
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(n)
            times[n].append((time.perf_counter() - start) / args.steps)
    for n, values in times.items():
        print(f"{n:3d} slices: " + " / ".join(f"{t:.2f}" for t in values) + " s a step")


if __name__ == "__main__":
    main()
