"""The command line: user errors exit 2 with one line and write nothing; the happy paths work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from localcredit.cli import main


def write_npz(path, n_train=200, n_test=50, shape=(8, 8), classes=3, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((n_train, *shape), dtype=np.float32),
              "y_train": rng.integers(0, classes, n_train),
              "x_test": rng.random((n_test, *shape), dtype=np.float32),
              "y_test": rng.integers(0, classes, n_test)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return f"npz:{path}"


def one_line_error(capsys, argv, expect):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and expect in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def good_npz(tmp_path):
    return write_npz(tmp_path / "good.npz")


BAD_INPUTS = {
    "unknown rule": (["train", "--rule", "nope", "--data", "fashion-mnist"], "unknown rule"),
    "unknown dataset": (["train", "--rule", "bp", "--data", "imagenet-22k"], "imagenet-22k"),
    "malformed hidden": (["train", "--rule", "bp", "--data", "fashion-mnist", "--hidden", "10,x"], "--hidden"),
    "negative hidden": (["train", "--rule", "bp", "--data", "fashion-mnist", "--hidden", "-5"], "--hidden"),
    "unknown option": (["train", "--rule", "fa", "--data", "fashion-mnist", "--set", "colour=red"], "colour"),
    "bad option value": (["train", "--rule", "fa", "--data", "fashion-mnist", "--set", "init=cauchy"], "init"),
    "option without =": (["train", "--rule", "fa", "--data", "fashion-mnist", "--set", "init"], "key=value"),
    "bad epochs": (["train", "--rule", "bp", "--data", "fashion-mnist", "--epochs", "0"], "--epochs"),
    "bad optimizer": (["train", "--rule", "bp", "--data", "fashion-mnist", "--optimizer", "lbfgs"], "optimizer"),
    "bad arch": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "transformer"], "arch"),
    "bad layer string": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "vgg", "--channels", "32,X"],
                         "--channels"),
    "layer string starts with M": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "vgg",
                                    "--channels", "M,32"], "--channels"),
    "too many pools": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "vgg",
                        "--channels", "8,M,8,M,8,M,8,M,8,M"], "too small"),
    "bad depth": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "resnet", "--depth", "9"], "6k+2"),
    "option of another arch": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "vgg", "--depth", "8"],
                               "--depth does not apply to --arch vgg"),
    "bad norm": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "vgg", "--norm", "layer"], "--norm"),
    "bad width": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch", "resnet", "--width", "0"], "--width"),
    "bad dropout": (["train", "--rule", "bp", "--data", "fashion-mnist", "--dropout", "1"], "--dropout"),
    "gaitprop on a conv net": (["train", "--rule", "gaitprop", "--data", "fashion-mnist", "--arch", "vgg"],
                               "invertible"),
    "non-square invertible layers": (["train", "--rule", "gaitprop", "--data", "fashion-mnist", "--arch", "invertible",
                                      "--hidden", "100,200"], "square"),
    "patch that does not tile": (["train", "--rule", "gaitprop", "--data", "fashion-mnist", "--arch",
                                  "invertible-conv", "--patches", "3"], "does not tile"),
    "bad patches": (["train", "--rule", "gaitprop", "--data", "fashion-mnist", "--patches", "2,x"], "--patches"),
    "patches on another arch": (["train", "--rule", "gaitprop", "--data", "fashion-mnist", "--patches", "2"],
                                "--patches does not apply to --arch invertible"),
    "hidden on invertible-conv": (["align", "--rule", "tp", "--data", "fashion-mnist", "--arch", "invertible-conv",
                                   "--hidden", "64"], "--hidden does not apply to --arch invertible-conv"),
    "invertible-conv without leaky relu": (["train", "--rule", "bp", "--data", "fashion-mnist", "--arch",
                                            "invertible-conv", "--activation", "tanh"], "leaky ReLU"),
    "no command": ([], "required"),
    "more modules than blocks": (["train", "--rule", "local-learned", "--data", "fashion-mnist", "--arch", "resnet",
                                  "--depth", "8", "--modules", "5"], "cannot cut 4 hidden block(s) into 5 modules"),
    "module counts that do not add up": (["train", "--rule", "dgl", "--data", "fashion-mnist", "--arch", "resnet",
                                          "--depth", "8", "--modules", "1,2"], "add up to the network's 4 hidden"),
    "malformed modules": (["train", "--rule", "dgl", "--data", "fashion-mnist", "--modules", "2,x"], "--modules"),
    "zero modules": (["train", "--rule", "dgl", "--data", "fashion-mnist", "--modules", "0"], "--modules"),
    "dgl's removed group option points to modules": (["train", "--rule", "dgl", "--data", "fashion-mnist", "--set",
                                                      "group=2"], "--modules K"),
    **{f"modules with {rule}, which has no local loss": (["train", "--rule", rule, "--data", "fashion-mnist",
                                                          "--modules", "2"], f"{rule} has none")
       for rule in ("bp", "fa", "dfa", "nan", "gaitprop", "tp", "itp")},
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expect = BAD_INPUTS[case]
    one_line_error(capsys, argv, expect)
    assert not (tmp_path / "runs").exists(), "nothing may be written on a user error"


@pytest.mark.parametrize("case,overrides,expect", [
    ("missing key", {"y_test": None}, "y_test"),
    ("label out of range", {"y_test": np.full(50, 7), "num_classes": np.array(3)}, "label"),
    ("negative label", {"y_train": np.full(200, -1)}, "label"),
    ("wrong shapes", {"x_test": np.zeros((50, 9, 9), np.float32)}, "shape"),
    ("length mismatch", {"y_train": np.zeros(10, np.int64)}, "y_train"),
])
def test_bad_npz_exits_2(case, overrides, expect, capsys, tmp_path):
    data = write_npz(tmp_path / "bad.npz", **overrides)
    out = tmp_path / "out"
    one_line_error(capsys, ["train", "--rule", "bp", "--data", data, "--out", str(out)], expect)
    assert not out.exists()


def test_missing_files_exit_2(capsys, tmp_path):
    one_line_error(capsys, ["train", "--rule", "bp", "--data", f"npz:{tmp_path}/absent.npz"], "absent.npz")
    one_line_error(capsys, ["train", "--rule", "bp", "--data", "cifar10", "--data-root", str(tmp_path)], "cifar")
    one_line_error(capsys, ["train", "--rule", "bp", "--data", "fashion-mnist", "--data-root", str(tmp_path)],
                   str(tmp_path))


def test_conv_on_vectors_exits_2(capsys, tmp_path):
    data = write_npz(tmp_path / "vectors.npz", shape=(20,))
    one_line_error(capsys, ["train", "--rule", "bp", "--data", data, "--arch", "conv"], "conv")
    one_line_error(capsys, ["train", "--rule", "gaitprop", "--data", data, "--arch", "invertible-conv"], "image data")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa"])
def test_train_on_unseen_npz_writes_result(rule, good_npz, tmp_path, capsys):
    out = tmp_path / rule
    assert main(["train", "--rule", rule, "--data", good_npz, "--hidden", "16", "--epochs", "2",
                 "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["rule"] == rule and result["epochs_completed"] == 2 and result["status"] == "ok"
    assert result["command"].startswith("localcredit train --rule")
    assert "test_accuracy 0." in capsys.readouterr().out


def test_conv_on_colour_images(tmp_path, capsys):
    data = write_npz(tmp_path / "colour.npz", shape=(16, 16, 3), classes=4)  # channels-last
    out = tmp_path / "conv"
    assert main(["train", "--rule", "dfa", "--data", data, "--arch", "conv", "--epochs", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "result.json").read_text())["arch"] == "conv"


def test_align_prints_json(good_npz, capsys):
    assert main(["align", "--rule", "bp", "--data", good_npz, "--hidden", "16,16", "--batch-size", "64"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["rule"] == "bp" and len(payload["cosine"]) == 3
    assert all(c > 0.9999 for c in payload["cosine"])


def test_align_run_measures_the_trained_network_of_a_run_folder(fashion_3k_npz, tmp_path, capsys):
    network = ["--hidden", "64", "--batch-size", "32"]
    for rule in ("bp", "fa"):
        assert main(["train", "--rule", rule, "--data", fashion_3k_npz, *network, "--epochs", "1",
                     "--out", str(tmp_path / rule), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["align", "--run", str(tmp_path / "bp")]) == 0
    captured = capsys.readouterr()
    bp = json.loads(captured.out)
    assert bp["rule"] == "bp" and bp["epochs_done"] == 1 and min(bp["cosine"]) > 0.9999
    meaning = captured.err.strip().splitlines()
    assert len(meaning) == 1 and "1 = same direction" in meaning[0] and str(tmp_path / "bp") in meaning[0]
    assert main(["align", "--rule", "fa", "--data", fashion_3k_npz, *network[:2]]) == 0
    at_init = json.loads(capsys.readouterr().out)["cosine"]
    assert main(["align", "--run", str(tmp_path / "fa")]) == 0
    trained = json.loads(capsys.readouterr().out)["cosine"]
    # One epoch of 94 steps aligns FA's hidden update with BP: 0.20-0.42 over seeds 0-4, from |c| <= 0.1 at init.
    assert trained[0] > 0.12 and trained[0] > at_init[0] + 0.05, (at_init, trained)


def test_align_run_refuses_a_folder_without_a_run_and_run_options(fashion_3k_npz, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["align", "--run", str(tmp_path / "absent")], "no such folder")
    one_line_error(capsys, ["align", "--run", str(tmp_path / "empty")], "no checkpoint.pt")
    assert main(["train", "--rule", "bp", "--data", fashion_3k_npz, "--hidden", "8", "--epochs", "1",
                 "--limit-train", "200", "--out", str(tmp_path / "bp"), "--quiet"]) == 0
    one_line_error(capsys, ["align", "--run", str(tmp_path / "bp"), "--rule", "fa"], "leave out --rule")
    (tmp_path / "bp" / "config.yaml").write_text((tmp_path / "bp" / "config.yaml").read_text()
                                                 .replace("- 8", "- 9"))  # another network than it trained
    one_line_error(capsys, ["align", "--run", str(tmp_path / "bp")], "other options")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bp", "empty"]


def test_batch_norm_with_a_last_step_of_one_sample_trains_and_steps_of_one_are_refused(fashion_3k_npz, tmp_path,
                                                                                         capsys):
    bn = ["train", "--rule", "bp", "--data", fashion_3k_npz, "--hidden", "64", "--norm", "batch", "--epochs", "1",
          "--quiet"]
    assert main([*bn, "--limit-train", "129", "--batch-size", "128", "--out", str(tmp_path / "bn")]) == 0
    assert json.loads((tmp_path / "bn" / "result.json").read_text())["status"] == "ok"
    one_line_error(capsys, [*bn, "--batch-size", "1", "--out", str(tmp_path / "one")], "batch norm")
    assert not (tmp_path / "one").exists()


def test_rules_and_datasets_list_json(capsys):
    assert main(["rules", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"bp", "fa", "dfa"} <= set(listing)
    assert any(opt["name"] == "init" for opt in listing["fa"]["options"])
    assert main(["datasets", "--json"]) == 0
    names = {entry["name"] for entry in json.loads(capsys.readouterr().out)}
    assert {"fashion-mnist", "mnist", "cifar10"} <= names


def test_installed_command_reports_user_error_without_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "localcredit")
    command = [exe] if os.path.exists(exe) else [sys.executable, "-m", "localcredit"]
    proc = subprocess.run([*command, "train", "--rule", "nope", "--data", "fashion-mnist"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown rule" in proc.stderr


def test_flush_denormal_flushes_while_training_and_restores_the_default(good_npz, tmp_path, monkeypatch):
    import torch

    subnormal = torch.tensor([1e-39])
    seen = []
    from localcredit.training.trainer import Trainer

    real_fit = Trainer.fit

    def fit(self, resume=False, **kwargs):
        seen.append((subnormal * 1.0).item())  # 0 when subnormals are flushed
        return real_fit(self, resume, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    for i, flag in enumerate((["--flush-denormal", "off"], ["--flush-denormal"], ["--flush-denormal", "on"], [])):
        assert main(["train", "--rule", "bp", "--data", good_npz, "--hidden", "8", "--epochs", "1",
                     "--out", str(tmp_path / str(i)), "--quiet", *flag]) == 0
    assert seen == [seen[0], 0.0, 0.0, 0.0] and seen[0] > 0  # on by default (results/denormal)
    assert (subnormal * 1.0).item() > 0  # torch's default is back after the run


@pytest.mark.parametrize("network", [["--arch", "vgg", "--channels", "8,M,16,M", "--hidden", "16"],
                                     ["--arch", "resnet", "--depth", "8", "--width", "0.5"],
                                     ["--arch", "lenet", "--width", "0.25", "--norm", "batch"]],
                         ids=["vgg", "resnet", "lenet"])
@pytest.mark.parametrize("rule", ["fa", "local-learned", "nan"])
def test_deep_networks_on_unseen_8x8_images(rule, network, tmp_path, capsys):
    data = write_npz(tmp_path / "small.npz", shape=(8, 8, 1), classes=3)  # channels-last 8x8 images
    out = tmp_path / "out"
    assert main(["train", "--rule", rule, "--data", data, *network, "--epochs", "1", "--out", str(out),
                 "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["arch"] == network[1] and result["status"] == "ok"
    assert result["network"]["norm"] == "batch" and result[network[2].lstrip("-")] is not None
    assert main(["align", "--rule", rule, "--data", data, *network, "--batch-size", "32"]) == 0
    cosines = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cosine"]
    assert len(cosines) == {"vgg": 4, "resnet": 5, "lenet": 5}[network[1]] and cosines[-1] > 0.9999


@pytest.mark.parametrize("argv,expect", [
    (["train", "--rule", "bp", "--data", "fashion-mnist", "--epochs", "x"], "argument --epochs: invalid int value"),
    (["train", "--rule", "bp", "--data", "fashion-mnist", "--epohcs", "3"], "(did you mean '--epochs'?)"),
    (["trian", "--rule", "bp"], "(did you mean 'train'?)"),
    (["train", "--rule", "fa", "--data", "fashion-mnist", "--set", "inti=uniform"], "(did you mean 'init'?)"),
    (["train", "--rule", "bpp", "--data", "fashion-mnist"], "(did you mean 'bp'?)"),
    (["train", "--rule", "bp", "--data", "fashon-mnist"], "(did you mean 'fashion-mnist'?)"),
])
def test_every_error_starts_the_same_and_a_misspelling_gets_a_suggestion(argv, expect, capsys, tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, argv, expect)
    assert line.startswith("localcredit: error: "), line  # argparse's own errors too, not "localcredit train:"
    assert not list(tmp_path.iterdir())


def test_a_misspelled_config_key_gets_a_suggestion(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rule: bp\ndata: fashion-mnist\nepoch: 3\n")
    line = one_line_error(capsys, ["train", "--config", str(config)], "unknown key 'epoch'")
    assert "(did you mean 'epochs'?)" in line


def test_the_data_error_and_the_help_list_every_data_set_from_one_list(capsys):
    from dataclasses import fields

    from localcredit.data import data_names
    from localcredit.experiment import RunSpec

    names = data_names()
    assert {"fashion-mnist", "mnist", "cifar10", "svhn", "npz:PATH", "imagefolder:PATH", "val:NAME"} == set(names)
    line = one_line_error(capsys, ["train", "--rule", "bp", "--data", "nonexistent"], "nonexistent")
    assert ", ".join(names) in line
    assert next(f for f in fields(RunSpec) if f.name == "data").metadata["help"] == " | ".join(names)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_run_files_respect_the_umask(umask, mode, good_npz, tmp_path):
    out = tmp_path / "run"
    previous = os.umask(umask)
    try:
        assert main(["train", "--rule", "bp", "--data", good_npz, "--hidden", "8", "--epochs", "1",
                     "--out", str(out), "--quiet"]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {"result.json": mode, "config.yaml": mode, "checkpoint.pt": mode}, modes
