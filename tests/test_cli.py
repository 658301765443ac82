"""The command line: train, resume, evaluate, --help, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vaelib
from vaelib.cli import build_parser, main
from vaelib.training.model_file import read_checkpoint

TINY = ["--hidden", "8", "--z-dim", "2", "--epochs", "2", "--test-k", "3"]


def run(argv: list[str]) -> int:
    """The exit status of ``vaelib ARGV``, run in this process (argparse exits through SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]["state_dict"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A two-epoch IWAE run on the digits."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--objective", "iwae", "--k", "3", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_the_run(trained):
    """run.json, the checkpoint, metrics.json with history, settings and test numbers, and a PNG."""
    assert sorted(p.name for p in trained.iterdir()) == ["checkpoint.pt", "metrics.json", "run.json", "samples.png"]
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["history"]["epoch"] == [1, 2] and metrics["history"]["objective"] == "iwae"
    assert metrics["settings"]["hidden"] == [8] and metrics["settings"]["k"] == 3 and metrics["n_test"] == 297
    assert metrics["settings"]["matmul_precision"] == "medium"
    assert metrics["test_bound"]["k"] == 3 and math.isfinite(metrics["test_bound"]["nats"])
    ll = metrics["test_log_likelihood"]
    assert ll["k"] == 3 and math.isfinite(ll["nats"]) and ll["standard_error"] > 0
    assert (trained / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vae = vaelib.load(trained / "checkpoint.pt")
    assert vae.config.hidden == (8,) and vae.z_dim == 2 and read_checkpoint(trained / "checkpoint.pt")["epoch"] == 2


def test_one_line_per_epoch_when_not_a_terminal(tmp_path, capsys):
    """Captured output is not a terminal: a summary line per epoch and no progress bar."""
    assert run(["train", *TINY, "--out", tmp_path / "r"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert re.fullmatch(r"epoch 1/2  train ELBO -\d+\.\d{3} nats  \d+\.\d\d s", lines[0])
    assert lines[1].startswith("epoch 2/2  train ELBO") and lines[2].startswith("test ELBO")
    assert "\r" not in out + err and "it/s" not in err


def test_resume_continues_to_the_same_weights(tmp_path):
    """Two epochs, then --resume to four: the same weights and history as four epochs at once."""
    args = ["train", "--hidden", "8", "--z-dim", "2", "--test-k", "2", "--seed", "5"]
    assert run([*args, "--epochs", "2", "--out", tmp_path / "a"]) == 0
    assert run([*args, "--epochs", "4", "--out", tmp_path / "a", "--resume"]) == 0
    assert run([*args, "--epochs", "4", "--out", tmp_path / "b"]) == 0
    assert same(weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt"))
    history = [json.loads((tmp_path / r / "metrics.json").read_text())["history"] for r in "ab"]
    assert history[0]["epoch"] == [1, 2, 3, 4] and history[0]["train_bound"] == history[1]["train_bound"]


def test_interrupted_run_exits_130_and_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C during epoch 2: exit status 130, one line saying how to go on; --resume completes the run."""
    real, calls = torch.optim.Adam.step, [0]

    def step(opt, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 20:  # 15 steps an epoch
            raise KeyboardInterrupt
        return real(opt, *args, **kwargs)

    args = ["train", *TINY, "--epochs", "3", "--out", tmp_path / "r"]
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    assert run(args) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err == "vaelib train: interrupted after epoch 1; add --resume to continue\n"
    assert read_checkpoint(tmp_path / "r" / "checkpoint.pt")["epoch"] == 1
    assert run([*args, "--resume"]) == 0
    assert run(["train", *TINY, "--epochs", "3", "--out", tmp_path / "fresh"]) == 0
    assert same(weights(tmp_path / "r" / "checkpoint.pt"), weights(tmp_path / "fresh" / "checkpoint.pt"))


def test_evaluate_prints_the_test_log_likelihood(trained, capsys):
    """evaluate loads the checkpoint and prints the importance-sampled log p(x) of the digits' test set."""
    assert run(["evaluate", trained, "--k", "40", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    match = re.fullmatch(
        r"test log-likelihood: (-\d+\.\d{4}) nats per image \(k=40, 297 test images of digits, "
        r"standard error \d+\.\d{4}\)\n",
        out,
    )
    assert match, out
    vae = vaelib.load(trained / "checkpoint.pt")
    test = torch.bernoulli(vaelib.data.load_digits()[1], generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        expected = vaelib.log_likelihood(vae, test, k=40, progress=False).double().mean()
    assert float(match.group(1)) == pytest.approx(float(expected), abs=1e-4)


def test_help_documents_every_option(capsys):
    """--help of each command lists every option, with defaults and the examples."""
    for command in ("train", "evaluate"):
        assert run([command, "--help"]) == 0
        text = capsys.readouterr().out
        sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, f"{command} --help does not mention {flag}"
        assert "examples:" in text and "vaelib evaluate runs/iwae5 --k 5000" in text
    assert run(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 50)", "(default: 0.001)", "(default: [200, 200])", "(default: auto)", "(default: 100)"):
        assert shown in text


def test_python_m_vaelib(tmp_path):
    """`python -m vaelib`: --help works, and a corrupt checkpoint is one line on stderr, exit 2, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shown = subprocess.run([sys.executable, "-m", "vaelib", "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "{train,evaluate}" in shown.stdout and "examples:" in shown.stdout
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip file")
    (tmp_path / "run.json").write_text(json.dumps({"format": "vaelib-run", "data": "digits", "seed": 0}))
    failed = subprocess.run(
        [sys.executable, "-m", "vaelib", "evaluate", str(tmp_path), "--k", "2"], capture_output=True, text=True, env=env
    )
    assert failed.returncode == 2 and failed.stdout == ""
    assert re.fullmatch(r"vaelib evaluate: error: .*checkpoint\.pt: not a readable checkpoint.*\n", failed.stderr)


def _bad_runs(tmp: Path, trained: Path) -> dict[str, tuple[list, str]]:
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "run.json").write_text((trained / "run.json").read_text())
    (corrupt / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes()[:500])
    (tmp / "empty_mnist").mkdir()
    out = ["--out", tmp / "new"]
    return {
        "k zero": (["train", "--k", "0", *out], r"argument --k: expected an integer >= 1, got 0"),
        "lr negative": (["train", "--lr", "-1", *out], r"argument --lr: expected a finite number > 0"),
        "lr nan": (["train", "--lr", "nan", *out], r"argument --lr: expected a finite number > 0"),
        "hidden word": (["train", "--hidden", "big", *out], r"argument --hidden: expected an integer >= 1"),
        "no out": (["train"], r"the following arguments are required: --out"),
        "unknown data": (["train", "--data", "cifar", *out], r"argument --data: invalid choice: 'cifar'"),
        "unknown command": (["fit"], r"invalid choice: 'fit' \(choose from 'train', 'evaluate'\)"),
        "mnist no root": (["train", "--data", "mnist", *out], r"--root: --data mnist needs the folder"),
        "mnist missing": (
            ["train", "--data", "mnist", "--root", tmp / "empty_mnist", *out],
            r"train-images-idx3-ubyte\.gz: missing; pass download=True",
        ),
        "analytic iwae": (["train", "--objective", "iwae", "--analytic-kl", *out], r"--analytic-kl: .*elbo only"),
        "bad device": (["train", "--device", "tpu", *out], r"device: expected 'auto', 'cpu', 'cuda' or 'mps'"),
        "existing run": (["train", *TINY, "--out", trained], r"already holds a run .* add --resume"),
        "resume other": (
            ["train", *TINY, "--hidden", "16", "--out", trained, "--resume"],
            r"--resume: .* other options \(--hidden \[8\] then, \[16\] now; --objective iwae then, elbo now; --k 3",
        ),
        "evaluate nothing": (["evaluate", tmp / "nothing"], r"nothing/checkpoint\.pt: no checkpoint"),
        "evaluate corrupt": (["evaluate", corrupt], r"corrupt/checkpoint\.pt: not a readable checkpoint"),
        "evaluate k": (["evaluate", trained, "--k", "-3"], r"argument --k: expected an integer >= 1, got -3"),
    }


BAD = [
    "k zero",
    "lr negative",
    "lr nan",
    "hidden word",
    "no out",
    "unknown data",
    "unknown command",
    "mnist no root",
    "mnist missing",
    "analytic iwae",
    "bad device",
    "existing run",
    "resume other",
    "evaluate nothing",
    "evaluate corrupt",
    "evaluate k",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(case, trained, tmp_path, capsys):
    """Each mistake: exit status 2 and one line on stderr saying what is wrong; nothing trained or written."""
    argv, message = _bad_runs(tmp_path, trained)[case]
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    assert run(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert re.match(r"vaelib( train| evaluate)?: error: ", err), err
    assert re.search(message, err), err
    assert not (tmp_path / "new").exists()
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before


def test_divergence_is_reported_and_the_checkpoint_kept(tmp_path, capsys):
    """A learning rate that blows up in epoch 2: exit 2 naming the epoch; the epoch-1 checkpoint loads."""
    out = tmp_path / "r"
    argv = ["train", "--likelihood", "gaussian", "--activation", "relu", "--hidden", "16", "--z-dim", "2"]
    argv += ["--batch-size", "1500", "--lr", "1000", "--epochs", "4", "--out", out]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaelib train: error: training diverged in epoch 2:") and err.count("\n") == 1
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in vaelib.load(out / "checkpoint.pt").parameters())
    assert not (out / "metrics.json").exists()
