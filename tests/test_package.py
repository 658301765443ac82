"""vaelib as a package people can reuse: what the wheel holds, its metadata, and its command line."""

from __future__ import annotations

import re
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests import _wheel

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return _wheel.build_wheel(tmp_path_factory)


@pytest.fixture(scope="session")
def reader_python(tmp_path_factory) -> Path:
    return _wheel.reader_venv(tmp_path_factory)


@pytest.fixture(scope="session")
def metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(zf.read(name).decode())


def _source_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"', (ROOT / "vaelib" / "__init__.py").read_text(), re.M)
    assert match, "vaelib/__init__.py sets no __version__"
    return match.group(1)


def test_wheel_holds_only_the_package(wheel):
    """Every file is under vaelib/ or its .dist-info: no book, tests, benchmarks or scripts."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"vaelib", f"vaelib-{_source_version()}.dist-info"}, sorted(tops)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_includes_the_type_marker_and_the_data(wheel):
    """py.typed (for type checkers) and digits.npz (the bundled data set) are in the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"vaelib/py.typed", "vaelib/digits.npz", "vaelib/__init__.py"} <= names
        assert zf.getinfo("vaelib/digits.npz").file_size > 0


def test_metadata_has_version_summary_and_readme(metadata):
    """The version is vaelib.__version__; a one-line summary; the readme as the long description."""
    assert metadata["Name"] == "vaelib"
    assert metadata["Version"] == _source_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", metadata["Version"])
    summary = metadata["Summary"] or ""
    assert 20 <= len(summary) <= 200 and "\n" not in summary, summary
    assert metadata["Description-Content-Type"] == "text/markdown"
    readme = metadata.get_payload() or metadata["Description"] or ""
    assert len(readme.strip()) > 200, "the readme is missing from the wheel's metadata"
    assert metadata["License-Expression"] == "MIT" or metadata["License"] == "MIT"


def test_dependencies_are_loose(metadata):
    """Requirements are ranges, not pins, so vaelib installs into Colab's torch and numpy."""
    requires = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    names = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires}
    assert {"torch", "numpy", "tqdm"} <= names, requires
    assert not [r for r in requires if "==" in r], f"pinned requirements: {requires}"


def test_installed_package_imports_from_the_environment(reader_python, tmp_path):
    """In the reader's environment vaelib is the installed copy and its bundled data loads."""
    code = "import vaelib, vaelib.data, importlib.resources as r; print(vaelib.__file__); print(vaelib.__version__);"
    code += "print(r.files('vaelib').joinpath('digits.npz').is_file())"
    out = _wheel.run([reader_python, "-c", code], cwd=tmp_path, timeout=120).stdout.split()
    assert Path(out[0]).is_relative_to(reader_python.parent.parent / "lib"), out[0]
    assert out[1:] == [_source_version(), "True"]


@pytest.mark.parametrize("how", ["module", "script"])
def test_command_line_help(reader_python, tmp_path, how):
    """`python -m vaelib --help` and the `vaelib` script print usage and exit 0."""
    cmd = [reader_python, "-m", "vaelib", "--help"] if how == "module" else [reader_python.parent / "vaelib", "--help"]
    proc = _wheel.run(cmd, cwd=tmp_path, timeout=120)
    assert proc.stdout.lower().startswith("usage:"), proc.stdout
    assert "vaelib" in proc.stdout
