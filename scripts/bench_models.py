"""Compare medseg's U-Nets with MONAI's at matched width, side by side in one run.

For each model: parameters, forward+backward time per step on a 3D patch on the CPU in fp32, in
bf16 autocast, and in bf16 autocast with channels_last_3d, and the peak memory of each (resident
set growth over the steps, measured in a fresh subprocess per model and mode).

    python scripts/bench_models.py [--patch 80 80 32] [--batch 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

WIDTH = (16, 32, 64, 128)
MODES = ("fp32", "bf16", "bf16+cl")
MODELS = ["unet", "residual_unet", "attention_unet", "monai.UNet", "monai.BasicUNet", "monai.AttentionUnet"]


def make(name: str, classes: int = 4):
    if name.startswith("monai."):
        from monai import networks

        if name == "monai.UNet":
            return networks.nets.UNet(3, 1, classes, channels=WIDTH, strides=(2, 2, 2), num_res_units=2)
        if name == "monai.BasicUNet":
            return networks.nets.BasicUNet(3, 1, classes, features=(*WIDTH, 2 * WIDTH[-1], WIDTH[0]))
        return networks.nets.AttentionUnet(3, 1, classes, channels=WIDTH, strides=(2, 2, 2))
    from medseg.models import build_model

    return build_model(name, 3, 1, classes, channels=WIDTH)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def measure(name: str, mode: str, patch, batch: int, steps: int) -> dict:
    """Run in a child process: time forward+backward steps of one model in one mode."""
    import torch

    torch.manual_seed(0)
    net = make(name)
    x = torch.randn(batch, 1, *patch)
    target = torch.randint(0, 4, (batch, *patch))
    bf16 = mode.startswith("bf16")
    if mode == "bf16+cl":
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    optimiser = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        loss = torch.nn.functional.cross_entropy(out.float(), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    baseline = _rss_mb()
    for _ in range(3):  # warm-up: oneDNN builds its kernels over the first calls
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "ms": 1000 * sorted(times)[len(times) // 2],
        "peak_mb": peak - baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", type=int, nargs=3, default=[80, 80, 32])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.patch, args.batch, args.steps)))
        return

    import torch

    print(
        f"3D patch {tuple(args.patch)}, batch {args.batch}, width {WIDTH}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {args.steps} steps (forward + backward + SGD)\n"
    )
    header = "| model | params | fp32 ms | bf16 ms | bf16+cl ms | fp32 MB | bf16 MB | bf16+cl MB |"
    print(header)
    print("|" + "---|" * 8)
    for name in MODELS:
        row = {}
        for mode in MODES:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                mode,
                "--patch",
                *map(str, args.patch),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        times = " | ".join(f"{row[m]['ms']:.0f}" for m in MODES)
        memory = " | ".join(f"{row[m]['peak_mb']:.0f}" for m in MODES)
        print(f"| {name} | {row['fp32']['params'] / 1e6:.2f} M | {times} | {memory} |", flush=True)


if __name__ == "__main__":
    main()
