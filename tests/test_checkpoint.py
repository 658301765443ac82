"""Saving and loading: round trips, atomic writes, and damaged, foreign or unsafe files."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vaelib
from tests._faults import FullDisk, one_line_error, temporaries
from vaelib._io.atomic import WriteError
from vaelib.cli import main
from vaelib.training.model_file import CheckpointError, atomic_save, read_checkpoint

X_DIM = 64


@pytest.fixture
def digits() -> torch.Tensor:
    return vaelib.data.load_digits()[0][:300]


def tiny(hidden: tuple[int, ...] = (8,), seed: int = 0) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(X_DIM, 2, hidden=hidden)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


@pytest.fixture
def checkpoint(tmp_path, digits) -> Path:
    """A training checkpoint of a tiny model after two epochs."""
    path = tmp_path / "run" / "checkpoint.pt"
    vaelib.fit(tiny(), digits, epochs=2, checkpoint=path, device="cpu", progress=False)
    return path


# -- round trips --------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    """A saved model comes back with its architecture and exactly its weights."""
    vae = vaelib.VAE.mlp(X_DIM, 3, hidden=(8, 5), activation="relu", likelihood="gaussian").double()
    back = vaelib.load(vaelib.save(vae, tmp_path / "sub" / "m.pt"))
    assert back.config == vae.config and next(back.parameters()).dtype == torch.float64
    assert same_weights(vae, back)


def test_load_a_training_checkpoint(checkpoint, digits):
    """vaelib.load reads the model out of a checkpoint written by fit."""
    again = tiny()
    vaelib.fit(again, digits, epochs=2, device="cpu", progress=False)
    assert same_weights(vaelib.load(checkpoint), again)
    assert read_checkpoint(checkpoint)["epoch"] == 2


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file, but the result is readable as open() would make it."""
    mask = os.umask(0)
    os.umask(mask)
    path = vaelib.save(tiny(), tmp_path / "m.pt")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_failed_write_keeps_the_old_file(tmp_path):
    """A save that fails part-way leaves the previous file intact and no temporary file."""
    path = vaelib.save(tiny(), tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_save({"not picklable": lambda: None, "weights": torch.ones(1000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_custom_networks_load_into_a_model_you_build(tmp_path):
    """A VAE of custom networks saves; load without a model says to pass one; load(model=) fills it."""
    torch.manual_seed(0)
    vae = vaelib.VAE(torch.nn.Linear(X_DIM, 4), torch.nn.Linear(2, X_DIM), x_dim=X_DIM, z_dim=2)
    vaelib.save(vae, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"networks of your own.*model=vae"):
        vaelib.load(tmp_path / "m.pt")
    torch.manual_seed(1)
    other = vaelib.VAE(torch.nn.Linear(X_DIM, 4), torch.nn.Linear(2, X_DIM), x_dim=X_DIM, z_dim=2)
    assert not torch.equal(other.encoder.weight, vae.encoder.weight)
    loaded = vaelib.load(tmp_path / "m.pt", model=other)
    assert loaded is other
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in vae.state_dict().items())
    wrong = vaelib.VAE(torch.nn.Linear(X_DIM, 6), torch.nn.Linear(3, X_DIM), x_dim=X_DIM, z_dim=3)
    with pytest.raises(CheckpointError, match=r"m\.pt: the weights do not fit the model: .* in the file"):
        vaelib.load(tmp_path / "m.pt", model=wrong)


# -- damaged files ------------------------------------------------------------------------


def damaged_copies(good: Path, folder: Path) -> dict[str, Path]:
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    variants = {
        "empty": b"",
        "truncated to 1 byte": data[:1],
        "truncated to half": data[: len(data) // 2],
        "one byte short": data[:-1],
        "random bytes": rng.bytes(len(data)),
        "text": b'{"format": "vaelib-model"}\n',
    }
    paths = {}
    for name, content in variants.items():
        paths[name] = folder / (name.replace(" ", "_") + ".pt")
        paths[name].write_bytes(content)
    other_zip = folder / "other_zip.pt"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("archive/data.pkl", rng.bytes(200))
    paths["a zip of noise"] = other_zip
    return paths


@pytest.mark.parametrize(
    "name",
    ["empty", "truncated to 1 byte", "truncated to half", "one byte short", "random bytes", "text", "a zip of noise"],
)
def test_damaged_checkpoint_is_a_clear_error(checkpoint, tmp_path, name):
    """Each kind of damage raises CheckpointError naming the file, from load and from resume."""
    path = damaged_copies(checkpoint, tmp_path)[name]
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(path))}: (the file is empty|not a readable checkpoint)"
    ) as err:
        vaelib.load(path)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: "):
        vaelib.fit(tiny(), torch.rand(10, X_DIM), epochs=3, checkpoint=path, progress=False, if_exists="resume")


def test_flipped_bit_in_the_weights_is_caught(checkpoint, tmp_path):
    """torch's zip reader skips CRC checks; a flipped bit inside a tensor must still be refused."""
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as z:
        member = max(z.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else -1)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len  # the member's bytes (stored uncompressed)
    data[start + member.file_size // 2] ^= 0x10
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(bad))}: damaged: the bytes of '{member.filename}' do not match"
    ):
        vaelib.load(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        vaelib.load(tmp_path / "absent.pt")


# -- foreign files: other models, other settings, other kinds -----------------------------


def test_resume_into_a_model_of_another_shape(checkpoint, digits):
    """Resuming a checkpoint into a differently shaped model names the file and the mismatch; the model is untouched."""
    other = tiny(hidden=(16,))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(checkpoint))}: written for another architecture \(saved, now\): "
        r"\{'hidden': \(\[8\], \[16\]\)\}",
    ):
        vaelib.fit(other, digits, epochs=3, checkpoint=checkpoint, device="cpu", progress=False, if_exists="resume")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_resume_with_other_settings(checkpoint, digits):
    """Different training settings would silently change the run: refused, with the difference shown."""
    with pytest.raises(
        CheckpointError, match=r"other training settings: other settings \(saved, now\): \{'lr': \(0\.001, 0\.01\)\}"
    ):
        vaelib.fit(tiny(), digits, epochs=3, lr=0.01, checkpoint=checkpoint, progress=False, if_exists="resume")


def test_resume_from_a_saved_model(tmp_path, digits):
    """A file from vaelib.save is a model, not a checkpoint to resume."""
    path = vaelib.save(tiny(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="a saved model, not a training checkpoint"):
        vaelib.fit(tiny(), digits, epochs=1, checkpoint=path, progress=False, if_exists="resume")


def test_weights_that_do_not_fit_the_recorded_architecture(checkpoint, tmp_path):
    """A file whose recorded architecture and weights disagree is refused by load."""
    obj = read_checkpoint(checkpoint)
    obj["model"]["config"]["hidden"] = [16]
    bad = atomic_save(obj, tmp_path / "mixed.pt")
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(bad))}: the weights do not fit the recorded architecture"
    ):
        vaelib.load(bad)


def test_incomplete_checkpoint_and_other_formats(checkpoint, tmp_path):
    """Missing parts, another format version, a file without vaelib's header: each named."""
    obj = read_checkpoint(checkpoint)
    cases = {
        "incomplete": ({k: v for k, v in obj.items() if k != "optimizer"}, "incomplete training checkpoint"),
        "version": ({**obj, "format_version": 99}, "format version 99 is not supported"),
        "foreign": ({"weights": torch.ones(3)}, "not a vaelib file"),
    }
    for name, (content, message) in cases.items():
        path = atomic_save(content, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=message):
            vaelib.load(path)


# -- unsafe files -------------------------------------------------------------------------


class _Payload:
    """Creates a marker file when unpickled: stands for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_checkpoint_is_refused(tmp_path):
    """A checkpoint that would run code when unpickled is refused by name, and the code never runs."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": "vaelib-model", "format_version": 1, "kind": "model", "x": _Payload(marker)}, path)
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(path))}: refused to load: the file holds a Python object \(io\.open\) that could run",
    ):
        vaelib.load(path)
    assert not marker.exists()
    # Control: the file really is dangerous to an unguarded loader.
    torch.load(path, weights_only=False)["x"].close()
    assert marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    """A bare pickle (not torch's zip format) is refused before any unpickling."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="not a PyTorch zip archive"):
        vaelib.load(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes()).close()  # control: it does run code when unpickled
    assert marker.exists()


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0", "MPLBACKEND": "Agg"}


def run(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


MEASURE = """
import resource, sys
import vaelib
from vaelib.training.model_file import CheckpointError
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
for path in sys.argv[1:]:
    before = peak()
    try:
        vaelib.load(path)
        outcome = "loaded"
    except CheckpointError as err:
        outcome = str(err)
    print(peak() - before, outcome, flush=True)
"""


def _inflating_copy(good: Path, bad: Path, inflated: int) -> None:
    """``good`` with its data.pkl deflated and padded with zeros to ``inflated`` bytes: a zip bomb."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if not info.filename.endswith("/data.pkl"):
                dst.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
                continue
            with dst.open(info.filename, "w", force_zip64=True) as f:
                f.write(data)
                zeros = bytes(1 << 20)
                for _ in range((inflated - len(data)) >> 20):
                    f.write(zeros)


@pytest.mark.slow
def test_crafted_checkpoints_are_refused_in_bounded_memory(tmp_path, digits):
    """A recorded architecture of 742 MB or of 10**12 units, and a 256 MB zip bomb, each in a file of
    kilobytes: refused with CheckpointError, and loading them raises the peak memory by under 40 MB."""
    good = tmp_path / "good.pt"
    vaelib.fit(tiny(), digits, epochs=1, checkpoint=good, progress=False)
    files = {}
    for name, hidden in (("wide", [1_000_000]), ("huge", [10**12])):
        obj = read_checkpoint(good)
        obj["model"]["config"]["hidden"] = hidden
        files[name] = atomic_save(obj, tmp_path / f"{name}.pt")
    files["bomb"] = tmp_path / "bomb.pt"
    _inflating_copy(good, files["bomb"], 256 << 20)
    assert all(p.stat().st_size < 1 << 20 for p in files.values()), {n: p.stat().st_size for n, p in files.items()}
    with pytest.raises(CheckpointError, match="do not fit the recorded architecture"):
        read_checkpoint(files["wide"])  # refused before torch.load reads the tensors, not only by load
    child = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, files.values())], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert child.returncode == 0, child.stderr[-2000:]
    results = dict(zip(files, child.stdout.splitlines(), strict=True))
    expected = {
        "wide": "the weights do not fit the recorded architecture",
        "huge": "the recorded architecture is invalid: hidden, z_dim: .* more than the 268,435,456 allowed",
        "bomb": "is compressed",
    }
    for name, line in results.items():
        grown, message = line.split(" ", 1)
        assert message.startswith(f"{files[name]}: "), line
        assert re.search(expected[name], message), line
        assert int(grown) < 40 << 20, f"{name}: peak memory grew by {int(grown) >> 20} MB"


def test_tensor_reaching_outside_its_storage_is_refused(tmp_path, digits):
    """A pickle that claims more elements than its storage member holds is refused before reading."""
    good = tmp_path / "good.pt"
    vaelib.save(tiny(), good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data/0"):
                data = data[:4]  # the member shrinks; the pickle still claims the full storage
            dst.writestr(info.filename, data)
    with pytest.raises(CheckpointError, match=r"storage 0 should hold \d+ bytes, but its member .* holds 4 bytes"):
        vaelib.load(bad)


def test_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, digits):
    path = tmp_path / "checkpoint.pt"
    FullDisk(monkeypatch, after=1)  # the first checkpoint is written, the second is not
    with pytest.raises(WriteError) as err:
        vaelib.fit(tiny(), digits, epochs=3, checkpoint=path, progress=False)
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and "\n" not in message
    assert message == f"{path}: could not be written (no space left on the device); the previous checkpoint is intact"
    assert read_checkpoint(path)["epoch"] == 1 and temporaries(tmp_path) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path, digits, value, capsys):
    path = tmp_path / "run" / "checkpoint.pt"
    vaelib.fit(tiny(), digits, epochs=1, checkpoint=path, progress=False)
    obj = read_checkpoint(path)
    obj["model"]["state_dict"]["decoder.0.weight"][0, 0] = value
    atomic_save(obj, path)
    pattern = rf"^{re.escape(str(path))}: holds NaN or infinite values \(model\.state_dict\.decoder\.0\.weight\)"
    with pytest.raises(CheckpointError, match=pattern):
        vaelib.load(path)
    with pytest.raises(CheckpointError, match=pattern):
        vaelib.fit(tiny(), digits, epochs=2, checkpoint=path, progress=False, if_exists="resume")
    (path.parent / "run.json").write_text(json.dumps({"format": "vaelib-run", "data": "digits", "seed": 0}))
    assert run(["evaluate", path.parent, "--k", "2"]) == 2
    assert "holds NaN or infinite values" in one_line_error(capsys)


def test_load_refuses_devices_this_machine_lacks(tmp_path):
    path = vaelib.save(tiny(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"^device: expected 'auto', 'cpu', 'cuda' or 'mps', got 'tpu'"):
        vaelib.load(path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: 'cuda' was asked for, but CUDA is not available"):
            vaelib.load(path, device="cuda")
