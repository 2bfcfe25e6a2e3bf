"""Achieved GFLOP/s of one prediction window, against a bf16 matmul on the same threads.

Counts the FLOPs of the network's forward pass with torch's FlopCounterMode, times it in each
precision and layout, and times a square bf16 and fp32 matmul as the CPU's practical peak.

    python scripts/bench_flops.py                       # the default unet, the heart demo's patch
    python scripts/bench_flops.py --model residual_unet --stem full --patch 64 80 28
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg.models import build_model


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: oneDNN picks and caches its kernels
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def forward_flops(net, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(x)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="unet")
    parser.add_argument("--stem", default="strided", choices=["strided", "full"])
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 80, 28])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    options = {
        "channels": args.channels,
        "strides": [[2, 2, 2], [2, 2, 2], [2, 2, 1]][: len(args.channels) - 1],
    }
    if args.model == "unet" and args.stem == "strided":
        options["stem_stride"] = [2, 2, 1]
    net = build_model(args.model, 3, 1, 4, **options).eval()
    # Two windows per forward, as the predictor runs them (infer.sw_batch_size). With one, torch
    # sends small fp32 3D convs to its slow native kernel instead of oneDNN.
    x = torch.randn(2, 1, *args.patch)
    flops = forward_flops(net, x)
    print(f"{args.model} ({args.stem} stem), 2 windows of {args.patch}: {flops / 1e9:.2f} GFLOP per forward")
    print("| run | ms per forward (median, min-max) | GFLOP/s |")
    print("|---|---|---|")
    for name, dtype, layout in (
        ("fp32", None, torch.contiguous_format),
        ("bf16", torch.bfloat16, torch.contiguous_format),
        ("bf16 + channels_last", torch.bfloat16, torch.channels_last_3d),
    ):
        model, inp = net.to(memory_format=layout), x.contiguous(memory_format=layout)

        def run(model=model, inp=inp, dtype=dtype):
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                model(inp)

        t = timed(run, args.repeats)
        median = statistics.median(t)
        spread = f"{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}"
        print(f"| {name} | {median * 1e3:.1f} ({spread}) | {flops / median / 1e9:.0f} |")
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        t = statistics.median(timed(lambda a=a, b=b: a @ b, args.repeats))
        print(f"| {str(dtype).split('.')[-1]} matmul 2048^2 | {t * 1e3:.1f} | {2 * 2048**3 / t / 1e9:.0f} |")


if __name__ == "__main__":
    main()
