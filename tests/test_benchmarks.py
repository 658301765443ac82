"""The benchmark scripts: tiny runs on the CPU so they cannot rot, and the keys of their records.

These tests check what the scripts compute and write, never how fast anything
is (the benchmarks themselves measure speed).
"""

from __future__ import annotations

import json
import math

import nbformat
import pytest
import torch
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import vaelib
from benchmarks import _record, book, iwae_table, loglik, throughput

HEADER_KEYS = {"benchmark", "device", "device_name", "torch", "commit", "date", "command"}


def _read(path) -> dict:
    return json.loads(path.read_text())


def test_gpu_slug():
    """GPU names shorten to their maker and model number."""
    assert _record.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100"
    assert _record.gpu_slug("NVIDIA A100-SXM4-40GB") == "nvidia-a100"
    assert _record.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert _record.gpu_slug("Tesla T4") == "tesla-t4"
    assert _record.device_slug(torch.device("cpu")) == "cpu"


def test_command_hides_path_values():
    """A record's command line keeps the options but not the paths given to them."""
    line = _record.command("loglik", ["--data-dir", "/somewhere/mnist", "--out=/elsewhere", "--n", "100"])
    assert line == "python -m benchmarks.loglik --data-dir DIR --out=DIR --n 100"


def test_toc_files_in_reading_order():
    """The table of contents is read root first, then parts and chapters in order."""
    toc = yaml.safe_load(
        "root: intro\nparts:\n  - chapters:\n      - file: a\n      - file: b\n        sections:\n          - file: c\n"
        "  - chapters:\n      - file: d\n"
    )
    assert book.toc_files(toc) == ["intro", "a", "b", "c", "d"]


def test_throughput_tiny(tmp_path):
    """Both ways train the same number of steps; the record has the rates, their ratio and both bounds."""
    record = throughput.main(
        [
            *("--train-size", "256", "--epochs", "2", "--repeats", "2", "--device", "cpu", "--threads", "1"),
            *("--eval-k", "2", "--out", str(tmp_path)),
        ]
    )
    saved = _read(tmp_path / "throughput-digits-cpu.json")
    assert saved == json.loads(json.dumps(record))
    expected = {
        "baseline_images_per_s",
        "vaelib_images_per_s",
        "vaelib_fp32_images_per_s",
        "ratio",
        "ratio_fp32",
        "precision_heldout_difference",
        "seconds_per_epoch",
        "baseline_final_bound",
        "vaelib_final_bound",
        "repeats",
        "warmup",
        "load_average_before",
    }
    assert HEADER_KEYS | expected <= saved.keys()
    assert saved["benchmark"] == "throughput" and saved["device"] == "cpu" and saved["data"] == "digits"
    assert saved["train_images"] == 256 and saved["steps_per_epoch"] == 2
    assert saved["matmul_precision"] == {"baseline": "highest", "vaelib": "medium", "vaelib_fp32": "highest"}
    for way in ("baseline", "vaelib", "vaelib_fp32"):
        runs = saved["per_run"][way]
        assert len(runs) == 2 and all(len(r["seconds"]) == 2 and len(r["train_bound"]) == 2 for r in runs)
    # The rate comes from the timed (second) epochs only: their median, here the mean of two.
    timed = [r["seconds"][1] for r in saved["per_run"]["vaelib"]]
    assert saved["vaelib_images_per_s"] == pytest.approx(256 / (sum(timed) / 2), rel=1e-3)
    assert saved["seconds_per_epoch"] == pytest.approx(sum(timed) / 2, abs=1e-6)
    assert saved["ratio"] == pytest.approx(saved["vaelib_images_per_s"] / saved["baseline_images_per_s"], rel=1e-2)
    assert saved["ratio_fp32"] == pytest.approx(
        saved["vaelib_fp32_images_per_s"] / saved["baseline_images_per_s"], rel=1e-2
    )
    assert len(saved["precision_heldout_difference_per_repeat"]) == 2
    for key in ("baseline_final_bound", "vaelib_final_bound", "vaelib_fp32_final_bound", "heldout_difference"):
        assert math.isfinite(saved[key])
    assert saved["baseline_final_bound"] < 0 and saved["vaelib_final_bound"] < 0
    assert isinstance(saved["bounds_agree"], bool)


def test_throughput_needs_a_warmup_epoch():
    """One epoch leaves nothing to time once the warm-up is left out."""
    with pytest.raises(ValueError, match="epochs"):
        throughput.main(["--epochs", "1", "--device", "cpu"])


def test_loglik_subset(tmp_path):
    """The record labels the subset and holds seconds, peak memory and a finite log-likelihood."""
    loglik.main(["--n", "8", "--k", "20", "--device", "cpu", "--out", str(tmp_path)])
    saved = _read(tmp_path / "loglik-digits-cpu.json")
    assert HEADER_KEYS | {"seconds", "peak_memory_mib", "memory_method", "n", "k", "subset"} <= saved.keys()
    assert saved["n"] == 8 and saved["k"] == 20 and not saved["full_size"]
    assert "first 8" in saved["subset"]
    assert saved["seconds"] > 0 and saved["peak_memory_mib"] > 0
    assert math.isfinite(saved["mean_log_likelihood"]) and saved["mean_log_likelihood"] < 0


@pytest.mark.slow
def test_book_times_each_notebook(tmp_path):
    """Notebooks run in table-of-contents order with progress bars off; a failing one is reported and fails the run."""
    folder = tmp_path / "book"
    folder.mkdir()
    (folder / "intro.md").write_text("# Intro\n")
    good = new_notebook(
        cells=[
            new_markdown_cell("# A chapter"),
            new_code_cell("import os\nassert os.environ['VAELIB_PROGRESS'] == '0'\nx = 1 + 1"),
        ]
    )
    nbformat.write(good, folder / "01_good.ipynb")
    nbformat.write(new_notebook(cells=[new_code_cell("1 / 0")]), folder / "02_bad.ipynb")
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: book/01_good\n  - file: book/02_bad\n"
        "  - file: book/03_not_written_yet\n"
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as failed:
        book.main(["--toc", str(toc), "--out", str(out)])
    assert failed.value.code == 1
    (path,) = out.glob("book-*.json")  # named after the device the notebooks would use
    saved = _read(path)
    assert HEADER_KEYS | {"notebooks", "total_seconds", "all_within_budget"} <= saved.keys()
    rows = saved["notebooks"]
    assert [r["notebook"] for r in rows] == ["book/01_good.ipynb", "book/02_bad.ipynb"]
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "error"
    assert "ZeroDivisionError" in rows[1]["error"]
    assert saved["failed"] == ["book/02_bad.ipynb"] and saved["missing"] == ["book/03_not_written_yet"]
    assert saved["total_seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=0.02)


@pytest.mark.slow
def test_iwae_table_smoke_resumes_exactly(tmp_path):
    """A smoke table stopped after stage 0 and resumed in worker processes equals one run straight through."""
    common = ["--smoke", "--device", "cpu", "--threads", "1"]
    split, straight = tmp_path / "split", tmp_path / "straight"
    out_split, out_straight = tmp_path / "out_split", tmp_path / "out_straight"

    first = iwae_table.main([*common, "--checkpoint-dir", str(split), "--out", str(out_split), "--until-stage", "0"])
    assert first is None and not out_split.exists()  # no table before every model has finished
    with pytest.raises(SystemExit, match="--resume"):
        iwae_table.main([*common, "--checkpoint-dir", str(split), "--out", str(out_split)])
    resumed = iwae_table.main(
        [*common, "--checkpoint-dir", str(split), "--out", str(out_split), "--resume", "--parallel", "processes"]
    )
    whole = iwae_table.main([*common, "--checkpoint-dir", str(straight), "--out", str(out_straight)])

    saved = _read(out_split / "iwae_table-smoke-cpu.json")
    assert HEADER_KEYS | {"train_seconds_total", "rows", "eval_k", "schedule"} <= saved.keys()
    assert saved["passes"] == 1 + 3 and saved["eval_k"] == iwae_table.SMOKE_EVAL_K and saved["smoke"]
    assert [(r["objective"], r["k"]) for r in saved["rows"]] == [
        ("vae", 1),
        ("vae", 5),
        ("vae", 50),
        ("iwae", 5),
        ("iwae", 50),
    ]
    for row in saved["rows"]:
        assert {"objective", "k", "layers", "test_nll", "active_units", "train_seconds"} <= row.keys()
        assert row["layers"] == 1 and 0 < row["test_nll"] < 64 * math.log(2)  # better than fair coin flips
        assert 0 <= row["active_units"] <= iwae_table.Z_DIM and row["train_seconds"] > 0
    assert [r["test_nll"] for r in resumed["rows"]] == [r["test_nll"] for r in whole["rows"]]
    assert [r["active_units"] for r in resumed["rows"]] == [r["active_units"] for r in whole["rows"]]
    # Only the last stage's checkpoint of each model is kept.
    assert sorted(p.name for p in split.glob("*.pt")) == sorted(f"{m}-stage1.pt" for m in iwae_table.MODELS)
    table = (out_split / "iwae_table-smoke-cpu.md").read_text()
    assert "84.78" in table and "Smoke run" in table


def test_iwae_table_schedule():
    """Eight stages of 3^i passes, 3280 in all, the learning rate falling by 10 every seven stages."""
    plan = iwae_table.schedule(8)
    assert [p for p, _ in plan] == [3**i for i in range(8)] and sum(p for p, _ in plan) == 3280
    assert plan[0][1] == pytest.approx(1e-3) and plan[7][1] == pytest.approx(1e-4)


def test_iwae_table_time_budget_stops_mid_stage_and_resumes(tmp_path, monkeypatch):
    """A budget spent after one pass of stage 1 stops there; resuming ends with the weights of a run never stopped."""
    train_x, _ = vaelib.data.load_digits()
    train_x = train_x[:100]
    s = iwae_table.spec("vae-k1")

    def settings(folder, deadline):
        return iwae_table.Settings(
            smoke=True,
            data_dir=None,
            device=torch.device("cpu"),
            checkpoint_dir=folder,
            stages=2,
            until_stage=None,
            deadline=deadline,
            seed=0,
        )

    # A clock that runs out after the third reading: the checks before stage 0, after
    # its one pass and before stage 1 pass; the one after stage 1's first pass does not.
    readings = iter([0.0, 0.0, 0.0])
    monkeypatch.setattr(iwae_table.time, "time", lambda: next(readings, 10.0))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    assert not iwae_table.train_model(s, train_x, settings(stopped, 5.0), progress=False)
    assert iwae_table.epochs_done(iwae_table.stage_path(settings(stopped, None), s, 1)) == 1
    assert iwae_table._read_progress(settings(stopped, None), s)["stages_done"] == [0]
    monkeypatch.undo()

    assert iwae_table.train_model(s, train_x, settings(stopped, None), progress=False)
    straight = tmp_path / "straight"
    straight.mkdir()
    assert iwae_table.train_model(s, train_x, settings(straight, None), progress=False)
    a = vaelib.load(iwae_table.stage_path(settings(stopped, None), s, 1)).state_dict()
    b = vaelib.load(iwae_table.stage_path(settings(straight, None), s, 1)).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
