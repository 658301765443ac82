"""vaelib as a package people can reuse: its layout, what the wheel holds, its metadata, and its command line."""

from __future__ import annotations

import ast
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
        assert {f"vaelib/{sub}/__init__.py" for sub in SUBPACKAGES} <= names, "a subpackage is missing"
        assert zf.getinfo("vaelib/digits.npz").file_size > 0


# -- the layout: math at the top, machinery below -------------------------------------

PACKAGE = ROOT / "vaelib"
SUBPACKAGES = ("training", "book", "_runtime", "_io")
MAX_LINES = 360


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by its dotted name, parsed."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def _all(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    return []


def test_the_house_has_its_two_levels():
    """The math is flat at the top; the engine, the runtime, the I/O and the book's helpers are below."""
    for sub in SUBPACKAGES:
        assert (PACKAGE / sub / "__init__.py").is_file(), sub
    tops = {p.stem for p in PACKAGE.glob("*.py")}
    math_modules = {"bounds", "toy", "bimodal", "models", "networks", "flows", "estimators", "iwae_gradients"}
    math_modules |= {"renyi", "objectives", "evaluate", "gaps", "rate_distortion", "anomaly", "data", "protocols"}
    assert math_modules | {"cli"} <= tops
    machinery = {"callbacks", "history", "batches", "checkpoint", "distributed", "threads", "devices", "synthesis"}
    assert not tops & machinery, f"machinery at the top: {sorted(tops & machinery)}"


def test_no_module_is_too_long():
    """No module of the package exceeds MAX_LINES lines; a longer one splits by what its parts do."""
    long = {
        str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_each_public_name_has_one_home():
    """No public name is in two modules' __all__, besides the curated shorthand of vaelib/__init__.py.

    A subpackage's __all__ lists its modules, which have no other home.
    """
    homes: dict[str, list[str]] = {}
    modules = _modules()
    for name, tree in modules.items():
        if name == "vaelib":
            continue
        for public in _all(tree):
            if f"{name}.{public}" not in modules:  # a package's __all__ naming its own modules
                homes.setdefault(public, []).append(name)
    twice = {public: where for public, where in homes.items() if len(where) > 1}
    assert not twice, twice


def test_the_shorthand_names_what_its_modules_define():
    """Every name vaelib re-exports is defined (or imported as a module) where it is imported from."""
    import importlib

    import vaelib

    for public in vaelib.__all__:
        obj = getattr(vaelib, public)
        home = getattr(obj, "__module__", None)
        if home is None or not home.startswith("vaelib"):
            continue  # a module, or the version string
        assert public in _all(_modules()[home]) or public == "__version__", (public, home)
        assert getattr(importlib.import_module(home), public) is obj


def test_no_private_name_is_imported_across_modules():
    """``from vaelib.x import _name`` nowhere in the package, the tests or the benchmarks.

    A helper that two modules share gets a public name in a private module.
    """
    imports = []
    for folder in ("vaelib", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vaelib":
                    imports += [
                        f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}"
                        for alias in node.names
                        if alias.name.startswith("_") and not alias.name.startswith("__")
                    ]
    assert imports == []


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
