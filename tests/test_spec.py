"""One run specification: every option reachable from the CLI, a config file and Python; config.yaml
repeats a run exactly; a bad config file is one line naming the key, exit 2, nothing written."""

import json
import re
from dataclasses import dataclass, fields
from typing import Literal

import pytest
import yaml

import localcredit as lc
from localcredit import spec as options
from localcredit.cli import build_parser, main
from localcredit.continual.strategies.ewc import option as strategy_option
from localcredit.experiment import RunSpec, read_config
from localcredit.rules import base as rules_base

from .test_cli import one_line_error, write_npz

#: A run with every option away from its default (not a sensible run: every field's round trip).
EVERY_OPTION = RunSpec(
    rule="fa", data="npz:/somewhere/data.npz", data_root="/somewhere", image_size=24, options=["init=gaussian"],
    arch="vgg", hidden=[32, 16], activation="tanh", channels="8,M,16,M", width=0.5, depth=14, norm="none",
    patches=[2, 1], modules=[1, 2],
    dropout=0.25, epochs=7, batch_size=64, seed=3, limit_train=500, eval_every=2, augment="crop:2,flip",
    lr_schedule="step", milestones=[2, 5], lr_decay=0.5, log="csv", optimizer="sgd", lr=0.02, momentum=0.8,
    weight_decay=1e-4)


def test_every_option_differs_from_its_default_in_the_reference_run():
    for f in options.option_fields(RunSpec):
        assert getattr(EVERY_OPTION, f.name) != options.default_of(f), f.name


def test_every_option_is_reachable_from_the_command_line():
    args = build_parser().parse_args(["train", *options.to_argv(EVERY_OPTION)])
    assert RunSpec(**options.given(args, RunSpec)) == EVERY_OPTION


def test_every_option_is_reachable_from_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(options.to_mapping(EVERY_OPTION)))
    assert RunSpec(**read_config(path)) == EVERY_OPTION
    # Strings as on the command line work too, and options may be a mapping.
    path.write_text("rule: fa\ndata: mnist\nhidden: '64,32'\nmilestones: 3\noptions: {init: gaussian}\nlr: 1e-3\n")
    assert read_config(path) == {"rule": "fa", "data": "mnist", "hidden": [64, 32], "milestones": [3],
                                 "options": ["init=gaussian"], "lr": 0.001}


def test_every_field_is_an_option_of_one_of_its_parts():
    # Nothing about a run lives outside the specification the CLI, config files and the bench derive from.
    assert all(options.is_option(f) for f in fields(RunSpec))


@pytest.fixture
def npz(tmp_path, fashion):
    import numpy as np

    path = tmp_path / "fashion-2k.npz"
    np.savez(path, x_train=fashion.x_train[:2000].numpy(), y_train=fashion.y_train[:2000].numpy(),
             x_test=fashion.x_test[:500].numpy(), y_test=fashion.y_test[:500].numpy())
    return f"npz:{path}"


def test_config_yaml_repeats_the_run_exactly_and_the_command_line_overrides_it(npz, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["train", "--rule", "local-learned", "--data", npz, "--hidden", "64", "--epochs", "2",
                 "--augment", "crop:1,flip", "--lr-schedule", "cosine", "--weight-decay", "1e-4",
                 "--set", "loss=mse", "--out", str(first), "--quiet"]) == 0
    config = first / "config.yaml"
    assert yaml.safe_load(config.read_text())["options"] == ["loss=mse"]
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert main(["train", "--config", str(config), "--epochs", "1", "--out", str(tmp_path / "shorter"),
                 "--quiet"]) == 0
    results = {name: json.loads((tmp_path / name / "result.json").read_text()) for name in ("first", "again", "shorter")}
    for key in ("test_accuracy_per_epoch", "train_loss_per_epoch", "options", "augment", "weight_decay"):
        assert results["again"][key] == results["first"][key], key
    assert results["shorter"]["epochs"] == 1 and results["shorter"]["augment"] == "crop:1,flip"


def test_python_fit_returns_the_result(npz, tmp_path):
    result = lc.fit(lc.RunSpec(rule="dfa", data=npz, hidden=[32], epochs=1), out=tmp_path / "py", progress=False)
    assert result["status"] == "ok" and 0 < result["test_accuracy"] <= 1
    assert json.loads((tmp_path / "py" / "result.json").read_text())["test_accuracy"] == result["test_accuracy"]
    assert yaml.safe_load((tmp_path / "py" / "config.yaml").read_text())["rule"] == "dfa"


BAD_CONFIGS = {
    "unknown key": ("rule: bp\ndata: mnist\nepoch: 3\n", "unknown key 'epoch'"),
    "wrong type": ("rule: bp\ndata: mnist\nepochs: many\n", "epochs:"),
    "float for int": ("rule: bp\ndata: mnist\nbatch_size: 12.5\n", "batch_size: expected int"),
    "out of range": ("rule: bp\ndata: mnist\nepochs: 0\n", "epochs must be at least 1"),
    "bad choice": ("rule: bp\ndata: mnist\nlr_schedule: linear\n", "lr_schedule must be one of"),
    "not a mapping": ("- rule\n- bp\n", "expected a mapping"),
    "not yaml": ("rule: [bp\n", "not valid YAML"),
    "bad list": ("rule: bp\ndata: mnist\nhidden: [10, x]\n", "hidden:"),
    "missing rule": ("data: mnist\n", "--rule"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_files_exit_2_with_one_line_naming_the_key(case, tmp_path, capsys):
    text, expect = BAD_CONFIGS[case]
    path = tmp_path / "run.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    line = one_line_error(capsys, ["train", "--config", str(path), "--out", str(out)], expect)
    assert case in ("missing rule",) or "run.yaml" in line
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    one_line_error(capsys, ["train", "--config", str(tmp_path / "absent.yaml")], "absent.yaml")


@pytest.mark.parametrize("argv,expect", [
    (["--lr-schedule", "step"], "needs --milestones"),
    (["--milestones", "3"], "applies to --lr-schedule step"),
    (["--milestones", "5,2", "--lr-schedule", "step"], "increasing"),
    (["--augment", "rotate:10"], "--augment"),
    (["--momentum", "1.5"], "--momentum"),
    (["--eval-every", "0"], "--eval-every"),
    (["--image-size", "32"], "imagefolder"),
])
def test_bad_recipe_options_exit_2(argv, expect, tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    one_line_error(capsys, ["train", "--rule", "bp", "--data", data, *argv, "--out", str(tmp_path / "out")], expect)
    assert not (tmp_path / "out").exists()


@dataclass
class Demo:
    """A Config declared as rules and strategies declare theirs."""

    scale: float = options.option(1.0, "a scale", check=options.positive)
    kind: Literal["a", "b"] = options.option("a", "a kind")
    on: bool = options.option(False, "a switch")


def test_rule_strategy_and_run_options_are_one_option_system():
    assert rules_base.option is options.option and strategy_option is options.option
    assert rules_base.parse_options(Demo, ["scale=2", "kind=b", "on=yes"]) == Demo(2.0, "b", True)
    assert rules_base.make_config(Demo, {"scale": 3}) == Demo(3, "a", False)
    for bad, message in ((["scale=-1"], "option scale must be positive, got -1.0"),
                         (["kind=c"], "option kind='c' is not one of a, b"),
                         (["on=maybe"], "option on='maybe' is not a valid bool"),
                         (["scal=2"], "unknown option 'scal' for this rule (did you mean 'scale'?)"),
                         (["scale"], "--set expects key=value")):
        with pytest.raises(lc.UserError, match=re.escape(message)):
            rules_base.parse_options(Demo, bad)
    with pytest.raises(lc.UserError, match=re.escape("option kind='c' is not one of a, b")):
        rules_base.make_config(Demo, {"kind": "c"})
    # the same field reads the same way from a config file, and describes itself to `localcredit rules`
    assert options.from_mapping(Demo, {"scale": "3", "kind": "b"}, "x.yaml") == {"scale": 3.0, "kind": "b"}
    assert options.describe(Demo)[1] == {"name": "kind", "type": "a|b", "default": "a", "help": "a kind"}
