"""How fast CPU torch runs each half of a convolution's backward, per FLOP (not a test).

    PYTHONPATH=. .venv/bin/python benchmarks/conv_backward.py [--out results/speed/conv-backward.json]
        [--threads 1] [--repeats 30]

A local rule skips what BP computes for a block's input (its input is detached), so on a conv net its
FLOP count falls by the input-gradient convolutions, while its weight-gradient convolutions stay.
If torch ran both halves at the same speed per FLOP, its step time would fall in proportion. This
times ``aten.convolution_backward`` alone for the conv layers of the conv suite's VGG (16,M,32,M,64,M
on 28x28 Fashion-MNIST, batch 128) and of ResNet-20's three widths, with the input gradient only,
the weight (and bias) gradient only, and both, as autograd asks for them, next to the forward
convolution; GFLOP/s of each (torch's own FLOP formulas: each half priced as the forward).
Median of ``--repeats`` calls after warm-up, one shape at a time, on the threads given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

aten = torch.ops.aten

#: (name, batch, in channels, out channels, height/width of the input), 3x3 kernels, padding 1, stride 1
SHAPES = [
    ("vgg conv1", 128, 1, 16, 28), ("vgg conv2", 128, 16, 32, 14), ("vgg conv3", 128, 32, 64, 7),
    ("resnet 16", 128, 16, 16, 28), ("resnet 32", 128, 32, 32, 14), ("resnet 64", 128, 64, 64, 7),
]


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(batch: int, c_in: int, c_out: int, size: int, repeats: int) -> dict[str, float]:
    x = torch.randn(batch, c_in, size, size)
    w = torch.randn(c_out, c_in, 3, 3) * 0.1
    b = torch.zeros(c_out)
    out = aten.convolution(x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    grad = torch.randn_like(out)
    flops = 2 * batch * c_out * size * size * c_in * 9  # one multiply-add = 2 FLOPs; each half the same

    def backward(mask):
        return lambda: aten.convolution_backward(grad, x, w, [c_out], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    result = {"forward_ms": median_ms(lambda: aten.convolution(x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
                                      repeats),
              "input_grad_ms": median_ms(backward([True, False, False]), repeats),
              "weight_grad_ms": median_ms(backward([False, True, True]), repeats),
              "both_ms": median_ms(backward([True, True, True]), repeats)}
    result.update({key.replace("_ms", "_gflops"): (2 * flops if key == "both_ms" else flops) / value / 1e6
                   for key, value in list(result.items())})
    result["mflop_each"] = flops / 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = []
    print("| layer | MFLOP each | forward GFLOP/s | input grad GFLOP/s | weight grad GFLOP/s | both GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, batch, c_in, c_out, size in SHAPES:
        r = measure(batch, c_in, c_out, size, args.repeats)
        rows.append({"layer": name, "batch": batch, "in": c_in, "out": c_out, "size": size, **r})
        print(f"| {name} | {r['mflop_each']:.0f} | {r['forward_gflops']:.1f} | {r['input_grad_gflops']:.1f} | "
              f"{r['weight_grad_gflops']:.1f} | {r['both_gflops']:.1f} |", flush=True)
    if args.out:
        command = "PYTHONPATH=. .venv/bin/python benchmarks/conv_backward.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        args.out.write_text(json.dumps({"command": command, "threads": args.threads, "torch": torch.__version__,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
