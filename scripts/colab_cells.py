"""Write (or check) the Colab install cell at the top of every notebook.

The repository URL and branch live once, in ``_config.yml``; the Colab launch
buttons and these cells both come from there. Run after changing them:

    python scripts/colab_cells.py          # rewrite the cells
    python scripts/colab_cells.py --check  # exit 1 if any notebook disagrees
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TAG = "remove-cell"
MARKER = "# Colab only:"


def repository(config_path: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """The repository URL and branch from ``_config.yml``."""
    config = yaml.safe_load(config_path.read_text())
    repo = config.get("repository") or {}
    url, branch = repo.get("url"), repo.get("branch", "main")
    if not url:
        raise SystemExit(f"{config_path}: repository.url is not set")
    return url.rstrip("/"), branch


def install_source(url: str, branch: str) -> str:
    """The text of the install cell for ``url`` at ``branch``."""
    return (
        f"{MARKER} install vaelib from the book's repository (no-op elsewhere).\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        f'    %pip install --quiet "vaelib @ git+{url}.git@{branch}"'
    )


def install_cell(url: str, branch: str) -> dict:
    """The install cell as notebook JSON, without outputs (as nbstripout leaves it)."""
    return {
        "cell_type": "code",
        "execution_count": None,
        "metadata": {"tags": [TAG]},
        "outputs": [],
        "source": install_source(url, branch).splitlines(keepends=True),
    }


def is_install_cell(cell: dict) -> bool:
    return cell.get("cell_type") == "code" and "".join(cell.get("source", [])).startswith(MARKER)


def notebooks(root: Path = ROOT) -> list[Path]:
    return sorted((root / "book").glob("*.ipynb"))


def problems(path: Path, url: str, branch: str) -> list[str]:
    """What is wrong with ``path``'s install cell (empty when it is right)."""
    cells = json.loads(path.read_text())["cells"]
    if not cells or not is_install_cell(cells[0]):
        return [f"{path.name}: the first cell is not the Colab install cell"]
    cell, found = cells[0], []
    if "".join(cell["source"]) != install_source(url, branch):
        found.append(f"{path.name}: the install cell disagrees with _config.yml ({url}@{branch})")
    if TAG not in cell.get("metadata", {}).get("tags", []):
        found.append(f"{path.name}: the install cell is not tagged {TAG!r}")
    if sum(is_install_cell(c) for c in cells) != 1:
        found.append(f"{path.name}: more than one install cell")
    return found


def write(path: Path, url: str, branch: str) -> bool:
    """Put the right install cell first in ``path``; return True if the file changed."""
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if not is_install_cell(c)]
    nb["cells"] = [install_cell(url, branch), *cells]
    if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) >= (4, 5):
        # Cell ids exist from nbformat 4.5 on; number them as nbstripout does, so the two tools agree.
        for i, cell in enumerate(nb["cells"]):
            cell["id"] = str(i)
    # The layout nbformat and Jupyter write, so that only the cell changes.
    text = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if text == path.read_text():
        return False
    path.write_text(text)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks that disagree")
    args = parser.parse_args(argv)
    url, branch = repository()
    if args.check:
        found = [p for path in notebooks() for p in problems(path, url, branch)]
        print("\n".join(found) or f"all {len(notebooks())} notebooks install from {url}@{branch}")
        return 1 if found else 0
    for path in notebooks():
        if write(path, url, branch):
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
