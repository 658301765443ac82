"""The contention, set-up time and GPU benchmarks, and the book build that fails on a broken notebook.

Tiny runs on the CPU and made-up inputs: what the scripts compute and write,
never how fast anything is.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import vaelib
from benchmarks import contention, gpu, inference_gaps, setup_time
from vaelib.gaps import inference_gaps as split_gaps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_book  # noqa: E402

HEADER_KEYS = {"benchmark", "device", "device_name", "torch", "commit", "date", "command"}


def _cell(seconds: float) -> dict:
    return {"seconds": [seconds], "median_seconds": seconds}


def test_contention_targets_from_the_medians():
    """Ratios are to the quiet median of the same policy; the targets read the vaelib policy's figures."""
    results = {
        "book": {
            "auto": {"0": _cell(1.0), "1": _cell(2.4), "2": _cell(3.5)},
            "torch": {"0": _cell(1.0), "1": _cell(5.6)},
        },
        "throughput": {"auto": {"0": _cell(2.0), "1": _cell(6.0)}, "torch": {"0": _cell(1.5)}},
    }
    targets = contention.summarize(results)
    assert results["book"]["auto"]["2"]["ratio_to_quiet"] == 3.5
    assert targets["book"] == {
        "one_beside_ratio": 2.4,
        "one_beside_met": True,
        "quiet_vs_torch": 1.0,
        "quiet_met": True,
        "torch_one_beside_ratio": 5.6,
    }
    assert targets["throughput"]["one_beside_ratio"] == 3.0 and not targets["throughput"]["one_beside_met"]
    assert targets["throughput"]["quiet_vs_torch"] == 1.33 and not targets["throughput"]["quiet_met"]


@pytest.mark.slow
def test_contention_tiny(tmp_path):
    """One epoch with and without one other training beside it: a record with both cells and the load."""
    args = ["--book-epochs", "1", "--repeats", "1", "--others", "0,1", "--workloads", "book", "--policy", "auto"]
    record = contention.main([*args, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "contention-digits-cpu.json").read_text())
    assert saved == record and HEADER_KEYS <= set(saved)
    cells = saved["results"]["book"]["auto"]
    assert set(cells) == {"0", "1"}
    for cell in cells.values():
        assert len(cell["seconds"]) == 1 and cell["median_seconds"] > 0
        assert "load_average_before" in cell
    assert cells["1"]["ratio_to_quiet"] == round(cells["1"]["median_seconds"] / cells["0"]["median_seconds"], 2)


def _git_repo(folder: Path, makefile: str) -> Path:
    folder.mkdir()
    (folder / "Makefile").write_text(makefile)
    for args in (
        ["init", "-q"],
        ["add", "Makefile"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m"],
    ):
        subprocess.run(["git", *args], cwd=folder, check=True)
    return folder


def test_setup_time_times_each_part(tmp_path):
    """Each part is `make TARGET` in a fresh clone, timed; the installer and the warnings are recorded."""
    makefile = (
        "install:\n\tmkdir -p .venv && echo $${UV:-pip} > .venv/.installed\n"
        "mathjax:\n\t@echo 'WARNING: something'\n\t@echo fine\n"
        "book:\n\t@exit 3\n"
    )
    repo = _git_repo(tmp_path / "repo", makefile)
    record = setup_time.main(["--repo", str(repo), "--installer", "pip", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "setup_time-pip-cpu.json").read_text())
    assert saved == record and HEADER_KEYS <= set(saved)
    parts = saved["parts"]
    assert parts["environment"]["status"] == 0 and parts["mathjax"]["warning_lines"] == 1
    assert parts["mathjax"]["warning_kinds"] == ["WARNING: something"]
    # make's own status is 2 when a recipe fails; the recipe's (3) is in the log
    assert parts["book"]["status"] == 2 and "Error 3" in "\n".join(parts["book"]["log_tail"])
    assert saved["installer_used"] == "pip"  # UV= was passed to make
    assert parts["notebooks"] == {"seconds": 0, "per_notebook": []}  # no Sphinx environment was built
    assert saved["total_seconds"] == round(sum(parts[p]["seconds"] for p in setup_time.PHASES), 1)
    assert set(saved["package_caches_mib"]) == {"uv", "pip", "npm"}


def test_setup_time_measures_the_package_caches(tmp_path, monkeypatch):
    """A warm cache is recorded by its size, so a run that downloads nothing is not read as a fresh one."""
    for name, mib in (("uv", 3), ("pip", 1), ("npm", 0)):
        folder = tmp_path / name / "deep"
        folder.mkdir(parents=True)
        (folder / "package.whl").write_bytes(b"x" * mib * 2**20)
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv"))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip"))
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm"))
    assert setup_time.package_caches() == {"uv": 3.0, "pip": 1.0, "npm": 0.0}


def test_failed_notebooks_read_from_the_build_environment(tmp_path):
    """The build's environment decides: a notebook whose last execution failed is named, others are not."""
    env = types.SimpleNamespace(
        found_docs={"book/ok", "book/broken", "intro"},
        nb_metadata={
            "book/ok": {"exec_data": {"succeeded": True, "error": None}},
            "book/broken": {"exec_data": {"succeeded": False, "error": "CellTimeoutError"}},
            "book/removed": {"exec_data": {"succeeded": False, "error": "CellExecutionError"}},
            "intro": {},
        },
    )
    (tmp_path / ".doctrees").mkdir()
    (tmp_path / ".doctrees" / "environment.pickle").write_bytes(pickle.dumps(env))
    assert build_book.failed_notebooks(tmp_path) == [("book/broken", "CellTimeoutError")]


def test_failed_notebooks_fall_back_to_the_reports(tmp_path):
    """Without a readable environment, the execution reports name the failures."""
    report = tmp_path / "html" / "reports" / "book" / "07_training.err.log"
    report.parent.mkdir(parents=True)
    report.write_text("Traceback")
    assert build_book.failed_notebooks(tmp_path) == [("book/07_training", "see the report")]


def _tiny_book(folder: Path) -> Path:
    folder.mkdir()
    (folder / "_config.yml").write_text("title: Tiny\nexecute:\n  execute_notebooks: force\n  timeout: 60\n")
    (folder / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: broken\n")
    (folder / "intro.md").write_text("# Intro\n")
    nb = new_notebook(cells=[new_markdown_cell("# Broken"), new_code_cell("raise ValueError('broken on purpose')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "broken.ipynb")
    return folder


@pytest.mark.slow
def test_book_build_fails_naming_the_notebook(tmp_path):
    """A tiny book whose notebook raises: the build goes on, then exits 1 naming the notebook, twice."""
    book = _tiny_book(tmp_path / "book")
    command = [sys.executable, str(ROOT / "scripts" / "build_book.py"), "--root", str(book)]
    for _ in range(2):  # the second build re-uses the first's environment and executes nothing
        out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=book)
        assert out.returncode == 1, out.stderr[-2000:]
        assert "broken.ipynb: CellExecutionError" in out.stderr
    assert (book / "_build" / "html" / "intro.html").exists()  # it built what it could


def test_gpu_command_skips_what_the_budget_cannot_hold(tmp_path):
    """With a budget too small for any part, each is skipped with a note and the summary is written."""
    record = gpu.main(["--tiny", "--budget", "1", "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert saved == record and HEADER_KEYS <= set(saved)
    assert set(saved["parts"]) == set(gpu.PARTS)
    assert all(p["status"].startswith("skipped") for p in saved["parts"].values())


def test_gpu_command_needs_the_data_unless_tiny(tmp_path):
    with pytest.raises(SystemExit):
        gpu.main(["--budget", "10", "--out", str(tmp_path)])


@pytest.mark.slow
def test_gpu_command_tiny(tmp_path):
    """Every part runs on the CPU with tiny settings, writes its record, and the summary names them."""
    nb = new_notebook(cells=[new_code_cell("import vaelib\nassert vaelib.default_device().type == 'cpu'")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "chapter.ipynb")
    out = tmp_path / "out"
    args = ["--tiny", "--budget", "590", "--min-part", "1", "--device", "cpu", "--out", str(out)]
    record = gpu.main([*args, "--chapter", str(tmp_path / "chapter.ipynb")])
    parts = record["parts"]
    assert {p: parts[p]["status"] for p in gpu.PARTS} == dict.fromkeys(gpu.PARTS, "ok"), parts
    for part in gpu.PARTS:
        assert (out / parts[part]["record"]).exists()
    assert parts["book"]["figures"]["failed"] == []
    assert set(parts["inference_gaps"]["figures"]) == {"gaussian", "flow"}
    assert parts["loglik"]["figures"]["subset"]
    assert record["seconds"] <= 590


def test_inference_gaps_joins_its_chunks_in_order(tmp_path):
    """The split taken in chunks equals inference_gaps on each chunk with that chunk's seed, row for row."""
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(64, 4, hidden=(16,))
    x = vaelib.data.binarize(vaelib.data.load_digits()[1][:5], generator=torch.Generator().manual_seed(0))
    args = types.SimpleNamespace(chunk=3, k=20, k_elbo=10, steps=3, seed=7)
    joined = inference_gaps.split(vae, x, "gaussian", args)
    assert joined.log_px.shape == (5,)
    for i, rows in enumerate((slice(0, 3), slice(3, 5))):
        alone = split_gaps(vae, x[rows], k=20, k_elbo=10, steps=3, seed=7 + 10 * i)
        for name in ("log_px", "elbo_amortized", "elbo_optimized"):
            assert torch.equal(getattr(joined, name)[rows], getattr(alone, name).double()), name


def test_inference_gaps_record(tmp_path):
    """A tiny run on the digits writes a record with both encoders' tables."""
    argv = ["--train-size", "100", "--epochs", "1", "--n", "4", "--k", "20", "--k-elbo", "10", "--steps", "3"]
    record = inference_gaps.main([*argv, "--chunk", "3", "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "inference_gaps-digits-cpu.json").read_text())
    assert saved == record and HEADER_KEYS <= set(saved)
    for name in ("gaussian", "flow"):
        table = saved[name]["table"]
        assert set(table) == {
            "log p(x)",
            "ELBO, encoder",
            "ELBO, optimized",
            "approximation gap",
            "amortization gap",
            "inference gap",
        }
        approx, amort = table["approximation gap"]["mean"], table["amortization gap"]["mean"]
        total = table["log p(x)"]["mean"] - table["ELBO, encoder"]["mean"]
        assert approx + amort == pytest.approx(total, abs=2e-4)  # four decimals each
    with pytest.raises(SystemExit):
        inference_gaps.main(["--n", "0", "--out", str(tmp_path)])
