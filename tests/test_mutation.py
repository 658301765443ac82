"""benchmarks.mutation: deliberate bugs, each run against the notebooks in a copy of the repository.

A tiny made-up repository (a two-function vaelib and two chapters) stands in for
the book, so these tests take seconds; the real list of mutations is checked
against the current source without running anything.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from benchmarks import mutation

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A repository whose first chapter checks vaelib.double and whose second only prints vaelib.half."""
    root = tmp_path / "repo"
    (root / "vaelib").mkdir(parents=True)
    source = "def double(x):\n    return 2 * x\n\n\ndef half(x):\n    return x / 2\n"
    (root / "vaelib" / "arith.py").write_text(source)
    (root / "vaelib" / "__init__.py").write_text("from vaelib.arith import double, half\n")
    (root / "tests").mkdir()
    unit_test = "from vaelib.arith import double\n\n\ndef test_double():\n    assert double(3) == 6\n"
    (root / "tests" / "test_arith.py").write_text(unit_test)
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Intro\n")
    checked = new_notebook(
        cells=[new_markdown_cell("# A"), new_code_cell("import vaelib\n\n# Check: 3 + 3\nassert vaelib.double(3) == 6")]
    )
    unchecked = new_notebook(cells=[new_markdown_cell("# B"), new_code_cell("import vaelib\n\nprint(vaelib.half(4))")])
    nbformat.write(checked, root / "book" / "01_checked.ipynb")
    nbformat.write(unchecked, root / "book" / "02_unchecked.ipynb")
    (root / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: book/01_checked\n  - file: book/02_unchecked\n"
    )
    return root


CAUGHT = mutation.Mutation("triple", "vaelib/arith.py", "return 2 * x", "return 3 * x", "double triples")
UNCAUGHT = mutation.Mutation("third", "vaelib/arith.py", "return x / 2", "return x / 3", "half takes a third")
UNMATCHED = mutation.Mutation("gone", "vaelib/arith.py", "return 4 * x", "return 5 * x", "text not in the file")


def test_caught_and_uncaught_mutants_are_recorded(tiny, tmp_path, monkeypatch):
    """The checked chapter catches one bug; the other passes every chapter, is reported, and fails the run."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = _digest(tiny)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as failed:
        argv = ["--root", str(tiny), "--out", str(out), "--timeout", "120", "--unit-tests"]
        mutation.main(argv, mutations=[CAUGHT, UNCAUGHT])
    assert failed.value.code == 1
    (path,) = out.glob("mutation-*.json")
    saved = json.loads(path.read_text())
    assert {"benchmark", "device", "commit", "date", "command"} <= saved.keys()
    assert saved["chapters"] == ["01_checked", "02_unchecked"]
    assert [r["chapter"] for r in saved["baseline"]] == ["01_checked", "02_unchecked"]
    assert all(r["status"] == "ok" for r in saved["baseline"])
    caught, uncaught = saved["mutations"]
    assert caught["name"] == "triple" and caught["caught_by"] == "01_checked" and caught["caught_by_check"]
    assert caught["error"].startswith("AssertionError")
    assert caught["line"] == "assert vaelib.double(3) == 6"
    assert caught["check"] == "# Check: 3 + 3"
    assert [r["chapter"] for r in caught["chapters_run"]] == ["01_checked"]  # stops at the first failure
    assert uncaught["caught_by"] is None and [r["status"] for r in uncaught["chapters_run"]] == ["ok", "ok"]
    assert saved["total"] == 2 and saved["caught"] == 1 and saved["uncaught"] == ["third"]
    # the module's own unit test catches the first bug; nothing tests half()
    assert caught["unit_tests"] == {"files": ["tests/test_arith.py"], "caught": True, "status": "failed"}
    assert uncaught["unit_tests"] == {"files": ["tests/test_arith.py"], "caught": False, "status": "passed"}
    # the checkout is untouched and no copy is left behind
    assert _digest(tiny) == before
    assert list(scratch.iterdir()) == []


def test_the_kernel_imports_the_mutant(tiny):
    """A chapter run against a copy sees the copy's vaelib, mutated, and not the installed one."""
    notebook = new_notebook(cells=[new_code_cell("import vaelib\nassert vaelib.double(3) == 9")])
    nbformat.write(notebook, tiny / "book" / "01_checked.ipynb")
    run = {"root": tiny, "chapters": ["book/01_checked.ipynb"], "timeout": 120, "kernel": None, "all_chapters": False}
    (unmutated,) = mutation.run_one(None, **run)
    assert unmutated["status"] == "error" and "AssertionError" in unmutated["error"]
    (mutated,) = mutation.run_one(CAUGHT, **run)  # double now triples: 3 * 3 == 9
    assert mutated["status"] == "ok"


def test_unmatched_original_text_is_an_error(tiny, tmp_path, capsys):
    """A mutation whose text is not in the source stops the run before any notebook executes."""
    with pytest.raises(SystemExit) as failed:
        mutation.main(["--root", str(tiny), "--out", str(tmp_path / "out")], mutations=[CAUGHT, UNMATCHED])
    assert failed.value.code == 2
    assert "gone: the original text occurs 0 times" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    with pytest.raises(mutation.MutationError, match="gone"):
        mutation.apply(UNMATCHED, tiny)


def test_every_mutation_matches_the_current_source_exactly_once():
    """The list stays in step with vaelib: each original text occurs once, and there are at least 12 bugs."""
    assert mutation.check(mutation.MUTATIONS, ROOT) == []
    assert len(mutation.MUTATIONS) >= 12
    assert all(m.path.startswith("vaelib/") and m.description for m in mutation.MUTATIONS)


def test_options_select_mutations_and_chapters(tiny):
    """--chapters keeps book order and refuses unknown names; --only refuses unknown mutations."""
    assert mutation.select_chapters(tiny, ["02_unchecked", "01_checked"]) == [
        "book/01_checked.ipynb",
        "book/02_unchecked.ipynb",
    ]
    with pytest.raises(SystemExit, match="--chapters"):
        mutation.select_chapters(tiny, ["03_missing"])
    with pytest.raises(SystemExit):
        mutation.main(["--root", str(tiny), "--only", "nope"], mutations=[CAUGHT])
