"""``localcredit plot RUN [RUN ...] --out curves.png``: the learning curves of finished (or stopped) runs.

One figure, two axes: test accuracy per epoch and mean training loss per epoch, read from each
RUN/result.json (``test_accuracy_per_epoch``, ``train_loss_per_epoch``); one line per run, labelled
``rule · network · data (seed s)``. Every input is checked before anything is drawn: a bad one is a
one-line UserError and no file is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import UserError
from ..training.checkpoint import atomic_write_bytes
from ..training.runfiles import RESULT

CURVES = ("test_accuracy_per_epoch", "train_loss_per_epoch")


def read_run(run: str | Path) -> dict[str, Any]:
    """RUN/result.json (RUN may also name the file itself), checked to hold per-epoch figures."""
    path = Path(run)
    if path.is_dir():
        path = path / RESULT
    if not path.is_file():
        raise UserError(f"{run} holds no {RESULT}; give run folders written by `localcredit train`")
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(result, dict) or not any(_points(result.get(key)) for key in CURVES):
        raise UserError(f"{path} holds no per-epoch figures ({' or '.join(CURVES)}); "
                        f"is it a training run that finished an epoch?")
    return result


def _points(values: Any) -> list[tuple[int, float]]:
    """(epoch from 1, value) of the epochs that have a number (an epoch not evaluated has None)."""
    if not isinstance(values, list):
        return []
    return [(epoch, float(v)) for epoch, v in enumerate(values, start=1)
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def label(result: dict[str, Any]) -> str:
    """``rule · network · data (seed s)``, the network as its architecture and shape options."""
    arch = result.get("arch") or "mlp"
    if result.get("channels"):
        network = f"{arch} {result['channels']}"
    elif result.get("depth"):
        network = f"{arch} depth {result['depth']}"
    elif isinstance(result.get("hidden"), list) and result["hidden"]:
        network = f"{arch} {','.join(map(str, result['hidden']))}"
    else:
        network = arch
    data = str(result.get("data", "?")).rsplit("/", 1)[-1]
    return f"{result.get('rule', '?')} · {network} · {data} (seed {result.get('seed', '?')})"


def plot_runs(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Draw the runs' curves into ``out`` (its format from its suffix: .png, .pdf, .svg, ...)."""
    if not runs:
        raise UserError("plot needs at least one RUN folder")
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    kind = out.suffix.lstrip(".").lower()
    if kind not in canvas.get_supported_filetypes():
        raise UserError(f"--out {out}: unknown image format {out.suffix or '(no suffix)'}; "
                        f"use one of {', '.join('.' + k for k in sorted(canvas.get_supported_filetypes()))}")
    results = [read_run(run) for run in runs]
    accuracy, loss = figure.subplots(1, 2)
    lines = []
    for i, result in enumerate(results):
        for axis, key in ((accuracy, CURVES[0]), (loss, CURVES[1])):
            points = _points(result.get(key))
            if points:
                epochs, values = zip(*points)
                drawn, = axis.plot(epochs, values, color=f"C{i % 10}", marker="o" if len(points) < 30 else None,
                                   markersize=3)
        lines.append(drawn)  # every run has a line on one axis at least (read_run)
    for axis, title in ((accuracy, "test accuracy"), (loss, "mean training loss")):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
    figure.legend(lines, [label(result) for result in results], loc="outside lower center", fontsize="small",
                  ncols=min(len(results), 2))
    atomic_write_bytes(out, lambda handle: figure.savefig(handle, format=kind, dpi=110))
    return out
