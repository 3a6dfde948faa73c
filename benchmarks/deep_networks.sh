#!/usr/bin/env bash
# Every rule on three deep networks (issue 12's acceptance runs), one run at a time:
#   Fashion-MNIST, first 20,000 training images, 2 epochs, the full test set, seed 0;
#   the same on Fashion-MNIST shrunk to 8x8 pixels (area average), with layouts that fit 8x8.
# Usage: bash benchmarks/deep_networks.sh [OUT]   (default results/networks; finished runs are skipped)
set -u
out=${1:-results/networks}
bin=${LOCALCREDIT:-.venv/bin/localcredit}
python=${PYTHON:-.venv/bin/python}
rules="bp fa dfa local-random local-learned lfnn-l lfnn nan-bp nan predsim dgl"
mkdir -p "$out/runs" "$out/data"

small=$out/data/fashion-8x8.npz   # not committed (*.npz is ignored): rebuilt from the Debian package
[ -f "$small" ] || "$python" - "$small" <<'PY'
import sys
import numpy as np
import torch
import torch.nn.functional as F
from localcredit.data import read_idx
root = "/usr/share/datasets/fashion-mnist"
def shrink(name, n=None):
    x = torch.tensor(read_idx(f"{root}/{name}-images-idx3-ubyte.gz", 2051)[:n], dtype=torch.float32)
    return F.interpolate(x[:, None] / 255, size=(8, 8), mode="area")[:, 0].numpy()
labels = lambda name, n=None: read_idx(f"{root}/{name}-labels-idx1-ubyte.gz", 2049)[:n]
np.savez(sys.argv[1], x_train=shrink("train", 20000), y_train=labels("train", 20000),
         x_test=shrink("t10k"), y_test=labels("t10k"))
PY

run() {  # run DATA-TAG ARCH-NAME RULE ARGS...
  local tag=$1 name=$2 rule=$3; shift 3
  local dir=$out/runs/$tag/$name-$rule
  [ -f "$dir/result.json" ] && return
  "$bin" train --rule "$rule" "$@" --epochs 2 --out "$dir" --quiet
  rm -f "$dir/checkpoint.pt"
}
for rule in $rules; do
  run fashion-mnist vgg "$rule" --data fashion-mnist --limit-train 20000 --arch vgg --channels 32,M,64,M,128,M
  run fashion-mnist resnet "$rule" --data fashion-mnist --limit-train 20000 --arch resnet --depth 8
  run fashion-mnist lenet "$rule" --data fashion-mnist --limit-train 20000 --arch lenet
  run fashion-8x8 vgg "$rule" --data "npz:$small" --arch vgg --channels 16,M,32,M --hidden 64
  run fashion-8x8 resnet "$rule" --data "npz:$small" --arch resnet --depth 8
  run fashion-8x8 lenet "$rule" --data "npz:$small" --arch lenet
done

# The table: results/networks/README.md (test accuracy, seconds per epoch).
"$python" - "$out" "$rules" <<'PY'
import json, sys
from pathlib import Path
out, rules = Path(sys.argv[1]), sys.argv[2].split()
columns = {"fashion-mnist": ["vgg", "resnet", "lenet"], "fashion-8x8": ["vgg", "resnet", "lenet"]}
lines = []
for tag, archs in columns.items():
    results = {(a, r): json.loads((out / "runs" / tag / f"{a}-{r}" / "result.json").read_text())
               for a in archs for r in rules}
    commands = {a: results[a, "bp"]["command"].replace("--rule bp", "--rule R").replace(f"/{a}-bp ", f"/{a}-R ")
                for a in archs}
    lines += [f"## {tag}", "", *(f"- `{a}`: `{commands[a]}`" for a in archs), "",
              "| rule | " + " | ".join(archs) + " |", "|---" * (len(archs) + 1) + "|"]
    for r in rules:
        cells = [f"{results[a, r]['test_accuracy']:.4f} ({sum(results[a, r]['seconds_per_epoch']) / 2:.1f} s)"
                 for a in archs]
        lines.append(f"| `{r}` | " + " | ".join(cells) + " |")
    lines.append("")
header = ["# Every rule on deep networks", "",
          "Made by `bash benchmarks/deep_networks.sh` (one run at a time, 2-core CPU, torch threads: torch's default).",
          "Test accuracy after 2 epochs, seed 0, Adam 1e-3, batch 128; in brackets the mean seconds per epoch.",
          "`fashion-8x8` is Fashion-MNIST shrunk to 8x8 pixels by area averaging (first 20,000 training images,",
          "the full test set), built by the script: image data the networks were not designed for.", ""]
(out / "README.md").write_text("\n".join(header + lines))
print(f"{out}/README.md")
PY
