"""Reading in Colab: the install cell, notebooks free of the site's macros, and a run away from the checkout."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from tests import _figures, _wheel

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"

# The notebook the Colab stand-in runs: the first of these that exists.
STAND_IN_PREFERENCE = (
    "03_kl_decomposition.ipynb",
    "02_jensen.ipynb",
    "04_importance_sampling.ipynb",
    "01_latent_variable_models.ipynb",
)


def _load_colab_cells():
    spec = importlib.util.spec_from_file_location("colab_cells", ROOT / "scripts" / "colab_cells.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab_cells = _load_colab_cells()


def _config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def _notebooks() -> list[Path]:
    found = colab_cells.notebooks(ROOT)
    assert found, "no notebooks under book/"
    return found


def _markdown_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]


# The install cell and the launch buttons ----------------------------------------------------


def test_every_notebook_starts_with_the_install_cell_from_config():
    """Cell 1 of each notebook is the install cell for _config.yml's repository, tagged remove-cell."""
    url, branch = colab_cells.repository(ROOT / "_config.yml")
    found = [p for path in _notebooks() for p in colab_cells.problems(path, url, branch)]
    assert not found, "\n".join(found) + "\nrun `python scripts/colab_cells.py` to rewrite the cells"


def test_launch_buttons_point_to_colab_for_a_github_repository():
    """The Colab button needs a colab_url and a GitHub repository.url (the theme builds the link from it)."""
    config = _config()
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    url = config["repository"]["url"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), f"repository.url {url!r} is not a GitHub repo"
    assert config["repository"].get("branch"), "repository.branch is not set"


def _notebook(tmp_path: Path, cells: list[dict], minor: int = 5) -> Path:
    path = tmp_path / "book" / "01_example.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": minor}
    path.write_text(json.dumps(nb, indent=1))
    return path


def _markdown(text: str) -> dict:
    return {"cell_type": "markdown", "id": "title", "metadata": {}, "source": [text]}


def test_script_writes_the_cell_once_and_check_accepts_it(tmp_path):
    """write() puts the cell first, replaces an old one, and leaves an up-to-date notebook alone."""
    old = colab_cells.install_cell("https://github.com/someone/old", "dev")
    path = _notebook(tmp_path, [_markdown("# Title"), old])
    url, branch = "https://github.com/someone/book", "main"
    assert colab_cells.problems(path, url, branch)
    assert colab_cells.write(path, url, branch)
    assert colab_cells.problems(path, url, branch) == []
    cells = json.loads(path.read_text())["cells"]
    assert [c["cell_type"] for c in cells] == ["code", "markdown"]
    assert [c["id"] for c in cells] == ["0", "1"], "cell ids are numbered as nbstripout numbers them"
    assert f"git+{url}.git@{branch}" in "".join(cells[0]["source"])
    assert not colab_cells.write(path, url, branch), "a second write changed the file"


def test_check_reports_a_missing_a_stale_and_an_untagged_cell(tmp_path):
    """problems() names each way the first cell can be wrong."""
    url, branch = "https://github.com/someone/book", "main"
    missing = colab_cells.problems(_notebook(tmp_path, [_markdown("# Title")]), url, branch)
    assert any("not the Colab install cell" in p for p in missing)

    stale = colab_cells.install_cell(url, "old-branch")
    assert any("disagrees" in p for p in colab_cells.problems(_notebook(tmp_path, [stale]), url, branch))

    untagged = colab_cells.install_cell(url, branch)
    untagged["metadata"] = {}
    assert any("not tagged" in p for p in colab_cells.problems(_notebook(tmp_path, [untagged]), url, branch))


def test_old_notebook_format_gets_no_cell_id(tmp_path):
    """Cell ids exist from nbformat 4.5 on; an older notebook stays valid."""
    path = _notebook(tmp_path, [_markdown("# Title")], minor=4)
    colab_cells.write(path, "https://github.com/someone/book", "main")
    assert "id" not in json.loads(path.read_text())["cells"][0]


# Notebooks read the same in Colab --------------------------------------------------------------


def _macro_pattern(names) -> re.Pattern:
    # A control sequence is a backslash and letters; `\\N` is a line break then N, not \N.
    return re.compile(r"(?<!\\)\\(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z])")


def test_macro_pattern_finds_whole_control_sequences_only():
    """\\E and \\KL are found; \\Exp, \\mathbb{E}, \\\\N and \\KLx are not."""
    pattern = _macro_pattern(["E", "KL", "elbo", "N"])
    hits = [m.group(0) for m in pattern.finditer(r"$\E_q[x] + \KL(q \Vert p)$, \elbo, \N(0, 1)")]
    assert hits == [r"\E", r"\KL", r"\elbo", r"\N"]
    assert not pattern.search(r"$\Exp \mathbb{E} \mathcal{N} a \\N \KLx \elbos$")


def test_notebooks_use_no_site_macros():
    """Notebook markdown writes math out (\\mathbb{E}, not \\E): Colab has no _config.yml macros."""
    macros = _config()["sphinx"]["config"]["mathjax3_config"]["tex"]["macros"]
    assert macros, "no macros in _config.yml to look for"
    pattern = _macro_pattern(macros)
    found = [
        f"{path.name}: {m.group(0)} in {text[max(0, m.start() - 30) : m.end() + 10]!r}"
        for path in _notebooks()
        for text in _markdown_cells(path)
        for m in pattern.finditer(text)
    ]
    assert not found, "site-only macros in notebooks:\n" + "\n".join(found)


# The Colab stand-in ----------------------------------------------------------------------------

# Runs in the reader's environment: executes the chapter, then asks its kernel where
# Python and vaelib came from.
_EXECUTE = textwrap.dedent(
    """
    import sys
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(sys.argv[1], as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys, vaelib; print(sys.executable); print(vaelib.__file__)"))
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": "."}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    nbformat.write(nb, sys.argv[2])
    print("".join(o.get("text", "") for o in nb.cells[-1].outputs), end="")
    """
)


@pytest.fixture(scope="session")
def reader_python(tmp_path_factory) -> Path:
    return _wheel.reader_venv(tmp_path_factory)


def _stand_in_notebook() -> Path:
    notebooks = _notebooks()
    by_name = {p.name: p for p in notebooks}
    return next((by_name[n] for n in STAND_IN_PREFERENCE if n in by_name), notebooks[0])


@pytest.mark.slow
def test_a_notebook_runs_with_only_the_installed_package(reader_python, tmp_path):
    """A chapter runs top to bottom in a fresh environment holding vaelib's wheel, outside the checkout."""
    notebook = shutil.copy(_stand_in_notebook(), tmp_path / "chapter.ipynb")
    script = tmp_path / "execute.py"
    script.write_text(_EXECUTE)
    # The kernel's matplotlib backend is left to the environment, as in the book's build:
    # inline, so that every figure is an image output.
    env = _wheel.clean_env(
        VAELIB_PROGRESS="0",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        # Only the reader environment's own kernel spec and no user configuration.
        JUPYTER_PATH="",
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    executed = tmp_path / "executed.ipynb"
    proc = _wheel.run([reader_python, script, notebook, executed], cwd=tmp_path, timeout=900, env=env)
    executable, vaelib_file = proc.stdout.strip().splitlines()[-2:]
    figures = [_figures.image_outputs(c) for c in _figures.code_cells(executed) if _figures.is_figure_cell(c)]
    assert figures, f"{notebook.name} draws no figure: pick a stand-in that does"
    assert figures == [1] * len(figures), f"images per figure cell: {figures} (one each expected)"
    prefix = reader_python.parent.parent
    assert Path(executable).parent.parent == prefix, f"the kernel ran {executable}, not the reader's Python"
    assert Path(vaelib_file).is_relative_to(prefix / "lib"), f"the kernel imported vaelib from {vaelib_file}"


def _ends_on_a_displayed_glue(source: str) -> bool:
    """Whether the cell's last statement is a ``glue(...)`` call whose value the notebook would display."""
    try:
        body = ast.parse(source).body
    except SyntaxError:  # a cell with IPython magics
        return False
    if not body or not isinstance(body[-1], ast.Expr) or not isinstance(body[-1].value, ast.Call):
        return False
    func = body[-1].value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name == "glue" and not source.rstrip().endswith(";")


def test_no_cell_shows_the_value_it_glues():
    """glue returns its value; a cell ending on the call would print a stray number under the prose."""
    assert _ends_on_a_displayed_glue('x = 1\nvaelib.glue("x", x)')
    assert not _ends_on_a_displayed_glue('x = 1\nvaelib.glue("x", x);')
    offenders = [
        f"{path.name}, cell {i}"
        for path in sorted(BOOK.glob("*.ipynb"))
        for i, cell in enumerate(json.loads(path.read_text())["cells"])
        if cell["cell_type"] == "code" and _ends_on_a_displayed_glue("".join(cell["source"]))
    ]
    assert offenders == [], f"end these cells with ';': {offenders}"
