"""CPU max-pooling by memory layout, on the conv suite's VGG's pooled maps (not a test).

    PYTHONPATH=. .venv/bin/python benchmarks/pooling.py [--out results/speed/pooling.json] [--threads 1]

The speed suite's profile (results/speed-split) puts 11 ms of BP's 46 ms VGG step in ``aten::max_pool2d``.
This times ``F.max_pool2d(x, 2)`` on the three maps the VGG pools (batch 128, after ReLU), on torch's
default contiguous (NCHW) layout and on channels-last (NHWC), next to a ReLU over the same tensor
(one read and one write: what a memory-bound pass costs), and the two layout conversions a
channels-last pool inside an NCHW network would add. Median of ``--repeats`` calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from conv_backward import median_ms  # the same timer (this script's folder is on sys.path)

#: (channels, height = width) of the VGG's three pooled maps (16,M,32,M,64,M on 28x28)
MAPS = [(16, 28), (32, 14), (64, 7)]


def measure_map(channels: int, size: int, repeats: int) -> dict[str, float]:
    x = torch.relu(torch.randn(128, channels, size, size))
    nhwc = x.contiguous(memory_format=torch.channels_last)
    pooled = F.max_pool2d(nhwc, 2)
    return {"channels": channels, "size": size,
            "nchw_ms": median_ms(lambda: F.max_pool2d(x, 2), repeats),
            "nhwc_ms": median_ms(lambda: F.max_pool2d(nhwc, 2), repeats),
            "conversions_ms": median_ms(lambda: (x.contiguous(memory_format=torch.channels_last), pooled.contiguous()),
                                        repeats),
            "relu_ms": median_ms(lambda: torch.relu(x), repeats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| map (batch 128) | max_pool2d NCHW ms | max_pool2d NHWC ms | to NHWC and back ms | ReLU ms |")
    print("|---|---|---|---|---|")
    for channels, size in MAPS:
        row = measure_map(channels, size, args.repeats)
        rows.append(row)
        print(f"| {channels}x{size}x{size} | {row['nchw_ms']:.2f} | {row['nhwc_ms']:.2f} | {row['conversions_ms']:.2f} "
              f"| {row['relu_ms']:.2f} |", flush=True)
    if args.out:
        command = "PYTHONPATH=. .venv/bin/python benchmarks/pooling.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.write_text(json.dumps({"command": command, "threads": args.threads, "torch": torch.__version__,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
