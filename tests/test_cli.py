"""The command line: train, resume, evaluate, --help, and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vaelib
from tests._faults import HOLD_LOCK, FullDisk, one_line_error, temporaries
from vaelib._io.lock import RunLocked
from vaelib.cli import build_parser, main
from vaelib.training.model_file import CheckpointError, read_checkpoint

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
    assert metrics["settings"]["hidden"] == [8] and metrics["n_test"] == 297
    assert metrics["settings"]["objective"] == {"name": "IWAE", "k": 3, "estimator": "reparam"}
    assert metrics["settings"]["matmul_precision"] == "medium"
    assert metrics["test_bound"]["k"] == 3 and math.isfinite(metrics["test_bound"]["nats"])
    ll = metrics["test_log_likelihood"]
    assert ll["k"] == 3 and math.isfinite(ll["nats"]) and ll["standard_error"] > 0
    assert (trained / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vae = vaelib.load(trained / "checkpoint.pt")
    assert vae.config.hidden == (8,) and vae.z_dim == 2 and read_checkpoint(trained / "checkpoint.pt")["epoch"] == 2


@pytest.mark.parametrize(
    ("flags", "value", "scored"),
    [
        (["--objective", "elbo", "--analytic-kl"], vaelib.ELBO(analytic_kl=True), "ELBO"),
        (["--objective", "iwae", "--k", "3", "--estimator", "dreg"], vaelib.IWAE(k=3, estimator="dreg"), "IWAE"),
        (
            ["--objective", "beta-elbo", "--beta", "0.5", "--warmup-epochs", "1"],
            vaelib.BetaELBO(0.5, warmup_epochs=1),
            "ELBO",
        ),
        (["--objective", "renyi", "--alpha", "0.5", "--k", "3"], vaelib.Renyi(0.5, k=3), "Renyi"),
    ],
    ids=["elbo", "iwae", "beta-elbo", "renyi"],
)
def test_each_objective_value_trains_from_the_command_line(tmp_path, capsys, flags, value, scored):
    """The CLI builds the objective value fit takes, records it, scores the test set with its bound,
    and a resume with other objective settings is refused, naming both."""
    out = tmp_path / "run"
    assert run(["train", *flags, *TINY, "--out", out]) == 0
    recorded = json.loads((out / "run.json").read_text())["objective"]
    assert recorded == value.settings()
    assert read_checkpoint(out / "checkpoint.pt")["settings"]["objective"] == value.settings()
    assert json.loads((out / "metrics.json").read_text())["test_bound"]["objective"]["name"] == scored
    capsys.readouterr()
    assert run(["train", *flags, "--k", "7", *TINY, "--epochs", "3", "--out", out, "--resume"]) == 2
    error = capsys.readouterr().err
    assert "other options" in error and "--objective" in error and "k=7" in error


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
            r"--resume: .* other options \(--hidden \[8\] then, \[16\] now; "
            r"--objective IWAE\(k=3, estimator='reparam'\) then, ELBO\(k=1, analytic_kl=False\) now",
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


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_state(a, b) -> bool:
    """Bitwise equality of nested checkpoint contents (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# One gradient step per epoch (batch = all 1500 images), so an epoch is mostly its checkpoint write.
KILL_EPOCHS = 150


KILL_ARGS = ["train", "--hidden", "4", "--z-dim", "2", "--batch-size", "1500", "--test-k", "2", "--seed", "3"]


KILL_ARGS += ["--epochs", str(KILL_EPOCHS)]


def _train_child(argv: list[str], log: str, kill_in_save: tuple[int, float] | None) -> None:
    """``vaelib train`` in a child process; with ``kill_in_save=(n, f)`` it SIGKILLs itself part-way
    through its n-th checkpoint write, after a fraction f of the file's bytes (f = 1: before the rename)."""
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if kill_in_save is not None:
        nth, fraction = kill_in_save
        real_save, calls = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] < nth:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: int(fraction * len(buffer.getvalue()))])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
    from vaelib.cli import main

    sys.exit(main(argv))


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".checkpoint.pt.*.tmp"))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_killed_training_resumes_bitwise(tmp_path):
    """SIGKILL at 25 seeded moments, half of them inside a checkpoint write: the checkpoint on disk
    always loads, and resuming each time ends with exactly the weights of an uninterrupted run."""
    rng = random.Random(20240611)
    # Children fork from a server that has already imported torch and vaelib: they start in milliseconds.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["vaelib.cli", __name__])
    log = str(tmp_path / "log.txt")

    def child(out: Path, kill_in_save=None, resume=True):
        argv = [*KILL_ARGS, "--out", str(out)] + (["--resume"] if resume else [])
        return ctx.Process(target=_train_child, args=(argv, log, kill_in_save))

    reference = child(tmp_path / "reference", resume=False)
    reference.start()
    reference.join(300)
    assert reference.exitcode == 0, Path(log).read_text()[-2000:]

    out = tmp_path / "killed"
    checkpoint = out / "checkpoint.pt"
    # Trial 0: the real entry point, `python -m vaelib train`, killed once it has written a few epochs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "vaelib", *KILL_ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for _ in range(rng.randint(1, 4)):
        assert proc.stdout.readline().startswith("epoch ")
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    epoch, in_write, trials = read_checkpoint(checkpoint)["epoch"], 0, 1
    for trial in range(24):
        if trial % 2 == 0:  # at a random moment: starting up, training, or writing
            p = child(out)
            p.start()
            time.sleep(rng.uniform(0.0, 0.15))
            p.kill()
        else:  # inside the n-th checkpoint write, after a random share of its bytes
            nth, fraction = rng.randint(1, 3), rng.choice([0.0, rng.random(), 1.0])
            p = child(out, kill_in_save=(nth, fraction))
            p.start()
        p.join(120)
        trials += 1
        assert p.exitcode in (-signal.SIGKILL, 0), Path(log).read_text()[-2000:]
        leftover = _temporaries(out)
        killed_in_write = trial % 2 == 1 and p.exitcode == -signal.SIGKILL
        if checkpoint.exists():
            saved = read_checkpoint(checkpoint)  # always loads, never half-written
            vaelib.load(checkpoint)
            assert saved["epoch"] >= epoch and saved["history"]["epoch"] == list(range(1, saved["epoch"] + 1))
            if killed_in_write:
                assert leftover, "a kill inside a write leaves its temporary file"
                assert saved["epoch"] == epoch + nth - 1, "the interrupted write must not replace the checkpoint"
            epoch = saved["epoch"]
        in_write += killed_in_write
    assert trials >= 20 and in_write >= 10 and 0 < epoch < KILL_EPOCHS, (trials, in_write, epoch)

    last = child(out)
    last.start()
    last.join(300)
    assert last.exitcode == 0, Path(log).read_text()[-2000:]
    assert _temporaries(out) == []  # the killed writes' temporary files are cleaned up
    resumed, uninterrupted = read_checkpoint(checkpoint), read_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    assert resumed["epoch"] == KILL_EPOCHS
    assert same_weights(resumed["model"]["state_dict"], uninterrupted["model"]["state_dict"])
    assert same_state(resumed["optimizer"], uninterrupted["optimizer"])
    assert resumed["history"]["train_bound"] == uninterrupted["history"]["train_bound"]


X_DIM = 64


QUICK = ["--hidden", "8", "--z-dim", "2", "--test-k", "2", "--batch-size", "500"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0", "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return vaelib.data.load_digits()[0][:300]


def tiny(activation: str = "tanh", seed: int = 0) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(X_DIM, 2, hidden=(8,), activation=activation)


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A finished two-epoch CLI run."""
    out = tmp_path / "run"
    assert run(["train", *QUICK, "--epochs", "2", "--out", out]) == 0
    return out


FSIZE = """
import os, resource, signal, sys
from vaelib.cli import main
out = sys.argv[1]
args = ["train", "--hidden", "64", "--z-dim", "2", "--test-k", "2", "--batch-size", "500", "--out", out]
assert main([*args, "--epochs", "1"]) == 0
# The kernel now refuses to grow any file past 4 kB (run.json fits; the checkpoint's 16 kB
# weight matrices do not): a real failing write, inside torch's writer if it wrote to the file.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
sys.exit(main([*args, "--epochs", "2", "--resume"]))
"""


def test_second_run_into_a_locked_folder_is_refused_with_the_holders_pid(tmp_path, capsys, digits):
    """While a live process holds the run's lock, train and fit are refused naming its pid; once it
    is killed (SIGKILL: no clean-up), its stale lock is taken over."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / ".checkpoint.pt.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        assert run(["train", *QUICK, "--epochs", "1", "--out", out]) == 2
        assert f"in use by another run (pid {holder.pid})" in one_line_error(capsys)
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            vaelib.fit(tiny(), digits, epochs=1, checkpoint=out / "checkpoint.pt", progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".checkpoint.pt.lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait(30)
    assert run(["train", *QUICK, "--epochs", "1", "--out", out]) == 0
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / ".checkpoint.pt.lock").exists()  # released and removed on exit


def test_out_must_be_a_run_a_new_folder_or_an_empty_one(tmp_path, capsys):
    """An empty --out and a folder of other files are refused and left untouched."""
    assert run(["train", *QUICK, "--epochs", "1", "--out", ""]) == 2
    assert "--out: expected a folder name" in one_line_error(capsys)
    for name in ("notes.txt", "metrics.json"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text("mine")
        for resume in ([], ["--resume"]):
            assert run(["train", *QUICK, "--epochs", "1", "--out", folder, *resume]) == 2
            assert f"not empty and not a run of 'vaelib train' (it holds {name})" in one_line_error(capsys)
        assert sorted(p.name for p in folder.iterdir()) == [name] and (folder / name).read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["train", *QUICK, "--epochs", "1", "--out", empty]) == 0


def test_full_disk_in_the_command_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    FullDisk(monkeypatch, after=2)  # run.json and the first checkpoint
    assert run(["train", *QUICK, "--epochs", "3", "--out", out]) == 2
    monkeypatch.undo()
    err = one_line_error(capsys)
    assert f"{out / 'checkpoint.pt'}: could not be written (no space left on the device)" in err
    assert err.endswith("the previous checkpoint is intact\n")
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and temporaries(out) == []


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_a_write_the_kernel_refuses_is_one_line_in_the_command_line(tmp_path):
    """With a file size limit (RLIMIT_FSIZE), torch's own writer would fail inside its zip writer
    ("unexpected pos"); the archive is built in memory, so the write fails as one clear line."""
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", FSIZE, str(out)], capture_output=True, text=True, env=ENV)
    assert child.returncode == 2, child.stderr[-2000:]
    expected = f"{out / 'checkpoint.pt'}: could not be written (File too large); the previous checkpoint is intact"
    assert child.stderr == f"vaelib train: error: {expected}\n"
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and temporaries(out) == []


def test_refused_resume_leaves_run_json_as_it_was(run_folder, capsys):
    """Without run.json the checkpoint's architecture is still compared; a refused resume writes nothing,
    so the right resume then succeeds."""
    (run_folder / "run.json").unlink()
    assert run(["train", *QUICK, "--activation", "relu", "--epochs", "3", "--out", run_folder, "--resume"]) == 2
    assert "another architecture" in one_line_error(capsys) and not (run_folder / "run.json").exists()
    assert run(["train", *QUICK, "--epochs", "3", "--out", run_folder, "--resume"]) == 0
    before = (run_folder / "run.json").read_bytes()
    assert run(["train", *QUICK, "--epochs", "1", "--out", run_folder, "--resume"]) == 2  # fewer epochs
    assert "already holds 3 epochs" in one_line_error(capsys)
    assert (run_folder / "run.json").read_bytes() == before
    assert run(["train", *QUICK, "--epochs", "3", "--out", run_folder, "--resume"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", str(2**64)], r"argument --seed: expected an integer in \[0, 18446744073709551615\]"),
        (["--hidden", str(10**12)], r"--hidden, --z-dim: .* more than the 268,435,456 allowed"),
        (["--z-dim", str(10**9)], r"--hidden, --z-dim: .* more than the 268,435,456 allowed"),
    ],
)
def test_cli_refuses_huge_arguments_and_writes_nothing(argv, message, tmp_path, capsys):
    assert run(["train", *argv, "--out", tmp_path / "new"]) == 2
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "new").exists()


def test_zero_epochs_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", *QUICK, "--epochs", "0", "--out", out]) == 0
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 0 and (out / "metrics.json").exists()
    assert run(["evaluate", out, "--k", "2"]) == 0
    assert run(["train", *QUICK, "--epochs", "1", "--out", out, "--resume"]) == 0
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_resume_asking_for_fewer_epochs_than_done_is_refused(run_folder, capsys):
    before = {p.name: p.read_bytes() for p in run_folder.iterdir()}
    assert run(["train", *QUICK, "--epochs", "1", "--out", run_folder, "--resume"]) == 2
    assert "epochs: " in (err := one_line_error(capsys)) and "already holds 2 epochs, more than the 1 asked for" in err
    assert {p.name: p.read_bytes() for p in run_folder.iterdir()} == before


def test_a_folder_named_like_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoint.pt"
    folder.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: a folder, not a checkpoint file"):
        vaelib.load(folder)
    assert run(["evaluate", tmp_path / "run"]) == 2
    assert "checkpoint.pt: a folder, not a checkpoint file" in one_line_error(capsys)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", 1)], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_is_handled_like_ctrl_c(tmp_path, signum):
    """SIGTERM (SIGHUP) mid-run: a message, exit status 143 (129), and a checkpoint at the last full epoch."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "vaelib",
        "train",
        *QUICK,
        "--batch-size",
        "100",
        "--epochs",
        "500",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().startswith("epoch 1/500")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    done = read_checkpoint(out / "checkpoint.pt")["epoch"]
    assert err == f"vaelib train: stopped by {name} after epoch {done}; add --resume to continue\n"
    assert 1 <= done < 500 and temporaries(out) == []
