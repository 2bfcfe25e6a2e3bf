"""Compare medseg's U-Nets with MONAI's at matched width, side by side in one run.

For each model: parameters, forward+backward time per step on a 3D patch on the CPU in fp32, in
bf16 autocast, and in bf16 autocast with channels_last_3d, the achieved GFLOP/s of each (FLOPs
counted by torch's FlopCounterMode), and the peak memory of each (resident set growth over the
steps, measured in a fresh subprocess per model and mode). ``--forward`` times prediction
instead: a forward pass in inference mode, as the predictor runs its windows. The last rows are
a square bf16 and fp32 matmul on the same threads: the CPU's practical peak.

    python scripts/bench_models.py [--patch 80 80 32] [--batch 2] [--steps 5]
    python scripts/bench_models.py --models unet --patch 64 80 28 --forward   # a demo window
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
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


def measure(name: str, mode: str, patch, batch: int, steps: int, forward: bool) -> dict:
    """Run in a child process: time training steps (or forwards) of one model in one mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

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

    def predict():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(x)

    if forward:
        net.eval()
        step = predict
    with FlopCounterMode(display=False) as counter:
        step()
    baseline = _rss_mb()
    for _ in range(3):  # warm-up: oneDNN builds its kernels over the first calls
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = sorted(times)[len(times) // 2]
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "ms": 1000 * median,
        "gflop": counter.get_total_flops() / 1e9,
        "gflops": counter.get_total_flops() / median / 1e9,
        "peak_mb": peak - baseline,
    }


def matmul_peak(dtype, steps: int) -> float:
    """GFLOP/s of a square matmul: what this CPU's threads reach on the easiest kernel."""
    import torch

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b  # warm-up: oneDNN picks its kernel
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", type=int, nargs=3, default=[80, 80, 32])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--forward", action="store_true", help="time prediction: forwards, inference mode")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.patch, args.batch, args.steps, args.forward)))
        return

    import torch

    what = "forward, inference mode" if args.forward else "forward + backward + SGD"
    print(
        f"3D patch {tuple(args.patch)}, batch {args.batch}, width {WIDTH}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"median of {args.steps} steps ({what})\n"
    )
    header = "| model | params | GFLOP | fp32 ms | bf16 ms | bf16+cl ms | GFLOP/s fp32 / bf16 / bf16+cl |"
    print(header + " fp32 MB | bf16 MB | bf16+cl MB |")
    print("|" + "---|" * 10)
    for name in args.models:
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
                *(["--forward"] if args.forward else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        times = " | ".join(f"{row[m]['ms']:.0f}" for m in MODES)
        rates = " / ".join(f"{row[m]['gflops']:.0f}" for m in MODES)
        memory = " | ".join(f"{row[m]['peak_mb']:.0f}" for m in MODES)
        size = f"{row['fp32']['params'] / 1e6:.2f} M | {row['fp32']['gflop']:.1f}"
        print(f"| {name} | {size} | {times} | {rates} | {memory} |", flush=True)
    peaks = {str(d).split(".")[-1]: matmul_peak(d, args.steps) for d in (torch.bfloat16, torch.float32)}
    print("\nmatmul 2048^2, GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))


if __name__ == "__main__":
    main()
