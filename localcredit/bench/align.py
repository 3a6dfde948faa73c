"""`localcredit align --run OUT`: alignment with backprop measured on a run folder's trained network.

The measurement itself (and that it changes nothing) is :mod:`localcredit.rules.alignment`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..rules.base import Rule

#: What the numbers `localcredit align` prints mean (one line, on stderr).
MEANING = ("cosine between the rule's update and backprop's gradient, per block (hidden blocks, then the head); "
           "1 = same direction, 0 = unrelated, -1 = opposite; measured on {where}")


def trained_rule(out: str | Path, data_root: str | None = None) -> tuple[Any, Any, Rule, dict[str, Any]]:
    """The run in the folder ``out``, trained: (spec, data, rule, checkpoint).

    Its ``config.yaml`` says which rule, network and data; its ``checkpoint.pt`` (of a finished run, or
    of an interrupted one, mid-epoch included) gives the weights and the rule's state, as ``--resume``
    restores them. ``data_root`` overrides where the data lives (not part of a run's identity).
    """
    from ..experiment import prepare, run_info, spec_from
    from ..training.runfiles import CHECKPOINT, CONFIG, load_checkpoint

    out = Path(out)
    if not out.is_dir():
        raise UserError(f"--run {out}: no such folder")
    checkpoint_path, config_path = out / CHECKPOINT, out / CONFIG
    if not checkpoint_path.exists():
        raise UserError(f"--run {out} holds no {CHECKPOINT} (a run writes one after each epoch); nothing to measure")
    if not config_path.exists():
        raise UserError(f"--run {out} holds no {CONFIG}, so which rule, network and data it trained is unknown")
    spec = spec_from(config_path, {} if data_root is None else {"data_root": data_root})
    state = load_checkpoint(checkpoint_path, "cpu")
    data, rule = prepare(spec)
    try:
        saved = json.loads(state["fingerprint"])["run"]
    except (TypeError, ValueError, KeyError):
        raise UserError(f"{checkpoint_path} is not a localcredit training checkpoint") from None
    expected = json.loads(json.dumps({k: v for k, v in run_info(spec, rule).items() if k != "data_root"}))
    if not isinstance(saved, dict) or {**saved, "epochs": None} != {**expected, "epochs": None}:
        raise UserError(f"{checkpoint_path} was made with other options than {config_path} says; "
                        f"was it edited after the run?")
    try:
        rule.load_checkpoint_state(state["rule"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{checkpoint_path} does not fit the network {config_path} describes "
                        f"({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__})") from None
    return spec, data, rule, state


def measured_on(out: str | Path, state: dict[str, Any]) -> str:
    """Which weights a checkpoint holds, in words: 'the trained network of OUT (after 3 epochs)'."""
    progress = state.get("epoch_progress")
    when = (f"epoch {progress['epoch'] + 1}, step {progress['steps_done']}" if progress
            else f"after {state['epochs_done']} epoch{'s' if state['epochs_done'] != 1 else ''}")
    return f"the trained network of {out} ({when})"
