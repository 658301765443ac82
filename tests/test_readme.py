"""The README's research examples run as they are, one after another, in a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def research_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Research with vaelib", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_the_research_examples_run(tmp_path, monkeypatch, capsys):
    """Every example of the section runs; the PPCA one shows an estimate nats off with k-hat over the limit."""
    pytest.importorskip("arviz")
    examples = research_examples()
    assert len(examples) == 9
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for code in examples:
        exec(compile(code, "README.md", "exec"), namespace)
    terms, gaps, test_x = (namespace[n] for n in ("terms", "gaps", "test_x"))
    assert terms.rate.shape == (test_x.shape[0],) and bool((terms.rate >= 0).all())
    mean, se = gaps.table()["amortization gap"]
    assert mean > -4 * se  # the optimized q is no worse than the encoder's
    history, result, model, x = (namespace[n] for n in ("history", "result", "model", "x"))
    assert history.stopped.startswith("EarlyStopping") and len(history) < 40
    assert (tmp_path / "run.csv").exists() and (tmp_path / "custom.pt").exists()
    gap = float((model.log_marginal(x) - result.log_px).mean())
    assert gap > 4 * float(result.se.mean()) and gap > 1.0
    assert bool((result.khat > result.khat_threshold).all())


@pytest.mark.slow
def test_the_research_examples_type_check(tmp_path):
    """mypy --strict (the project's configuration) accepts the research examples as one module."""
    pytest.importorskip("mypy")
    source = tmp_path / "readme_examples.py"
    source.write_text("\n".join(research_examples()))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(source)],
        capture_output=True,
        text=True,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
