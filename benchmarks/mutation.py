"""Deliberate bugs in vaelib's math, one at a time, and the chapter whose check catches each.

The book promises that its check cells would fail if vaelib computed the wrong
thing. This script keeps the promise honest: for each mutation (a file, an
exact piece of its text, a replacement and what the bug means) it copies the
repository's ``vaelib/``, ``book/`` and ``_toc.yml`` into a temporary folder,
applies the bug there, and executes the chapters in book order against the
mutant (``PYTHONPATH`` points at the copy, and a first cell asserts that the
kernel imported the copy). The first chapter that fails caught the bug. The
real checkout is never written to, even if the run is killed.

Before any mutant runs, every original text must occur exactly once in the
current source (otherwise the list is out of step with the code and the run
stops), and the unmutated copy must pass every selected chapter (otherwise a
failure would say nothing about the bug).

Usage::

    python -m benchmarks.mutation                       # every mutation, every chapter
    python -m benchmarks.mutation --only iwae-no-log-k  # one mutation (repeat --only for more)
    python -m benchmarks.mutation --chapters 02_jensen 05_synthesis --timeout 300
    python -m benchmarks.mutation --all-chapters        # run every chapter on every mutant
    python -m benchmarks.mutation --unit-tests          # also record whether the unit tests catch each bug
    python -m benchmarks.mutation --list

Exits with status 1 if a mutant passes every chapter it ran, 2 if the list or
the baseline is broken.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from benchmarks import _record, book
from vaelib._runtime.devices import default_device

COPIED = ("vaelib", "book", "_toc.yml", "_config.yml")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_IGNORED = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "_build", "*.pyc")


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: replace ``original`` (which must occur exactly once) in ``path``."""

    name: str
    path: str  # relative to the repository root
    original: str
    replacement: str
    description: str


class MutationError(ValueError):
    """A mutation's original text is missing from its file, or occurs more than once."""


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "iwae-no-log-k",
        "vaelib/bounds.py",
        "return torch.logsumexp(log_w, dim=0) - math.log(k)",
        "return torch.logsumexp(log_w, dim=0)",
        "the IWAE bound without its -log k: log of the sum of the weights, not of their mean",
    ),
    Mutation(
        "elbo-is-iwae",
        "vaelib/bounds.py",
        "    return log_w.mean(dim=0)\n",
        "    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])\n",
        "the ELBO estimate computed as the IWAE bound (log of the mean weight instead of the mean log weight)",
    ),
    Mutation(
        "log-weight-sign",
        "vaelib/bounds.py",
        "return log_joint(x, z) - q.log_prob(z)  # (k, batch)",
        "return log_joint(x, z) + q.log_prob(z)  # (k, batch)",
        "log w = log p(x, z) + log q(z | x): the proposal multiplies instead of divides",
    ),
    Mutation(
        "elbo-kl-sign",
        "vaelib/toy.py",
        "return self.expected_log_likelihood(x, q) - kl_divergence(q, self.prior)",
        "return self.expected_log_likelihood(x, q) + kl_divergence(q, self.prior)",
        "the sign of the KL in the linear-Gaussian ELBO: reconstruction plus KL(q || p(z))",
    ),
    Mutation(
        "elbo-kl-order",
        "vaelib/toy.py",
        "return self.expected_log_likelihood(x, q) - kl_divergence(q, self.prior)",
        "return self.expected_log_likelihood(x, q) - kl_divergence(self.prior, q)",
        "the order of the KL's arguments in the linear-Gaussian ELBO: KL(p(z) || q)",
    ),
    Mutation(
        "posterior-precision",
        "vaelib/toy.py",
        "+ self.W.T @ self.W / self.noise_std**2",
        "+ self.W.T @ self.W / self.noise_std",
        "a wrong posterior precision: I + W^T W / sigma instead of I + W^T W / sigma^2",
    ),
    Mutation(
        "posterior-mean-offset",
        "vaelib/toy.py",
        "loc = (x - self.b) @ self.W @ cov / self.noise_std**2",
        "loc = x @ self.W @ cov / self.noise_std**2",
        "the posterior mean forgets the offset b",
    ),
    Mutation(
        "gaussian-normalizer",
        "vaelib/toy.py",
        "const = -0.5 * self.x_dim * math.log(2 * math.pi * var)",
        "const = -0.5 * self.x_dim * math.log(math.pi * var)",
        "a wrong Gaussian normalizer in the closed-form expected log-likelihood: (pi sigma^2)^(-d/2)",
    ),
    Mutation(
        "elbo-trace-term",
        "vaelib/toy.py",
        "return const - 0.5 * ((resid**2).sum(-1) + trace) / var",
        "return const - 0.5 * (resid**2).sum(-1) / var",
        "the closed-form linear-Gaussian ELBO drops the trace term tr(W S W^T) of q's spread",
    ),
    Mutation(
        "marginal-noise-variance",
        "vaelib/toy.py",
        "cov = self.W @ self.W.T + self.noise_std**2 * torch.eye",
        "cov = self.W @ self.W.T + self.noise_std * torch.eye",
        "the evidence's covariance W W^T + sigma I instead of W W^T + sigma^2 I",
    ),
    Mutation(
        "score-term-dropped",
        "vaelib/estimators.py",
        "return (pathwise + ((log_p - log_q).detach() - b) * score).mean(dim=0)",
        "return (log_p - log_q).mean(dim=0)",
        "the score-function surrogate without its score term: only the pathwise part of the gradient",
    ),
    Mutation(
        "analytic-kl-sign",
        "vaelib/estimators.py",
        "return _likelihood(model, z).log_prob(x).mean(dim=0) - kl(q, model.prior)",
        "return _likelihood(model, z).log_prob(x).mean(dim=0) + kl(q, model.prior)",
        "the analytic-KL surrogate adds KL(q || p(z)) instead of subtracting it",
    ),
    Mutation(
        "vae-kl-sign",
        "vaelib/models.py",
        "return reconstruction - kl_divergence(q, self.prior)",
        "return reconstruction + kl_divergence(q, self.prior)",
        "the VAE's analytic-KL ELBO adds KL(q || p(z))",
    ),
    Mutation(
        "loglik-no-log-k",
        "vaelib/evaluate.py",
        "log_px = log_sum - math.log(k)",
        "log_px = log_sum",
        "the importance-sampled log-likelihood without its -log k",
    ),
    Mutation(
        "bimodal-evidence-step",
        "vaelib/bimodal.py",
        "return torch.logsumexp(self.log_joint(x, z), dim=0) + math.log(dz)  # (grid, batch) -> (batch,)",
        "return torch.logsumexp(self.log_joint(x, z), dim=0)  # (grid, batch) -> (batch,)",
        "the bimodal model's evidence by quadrature forgets the grid step dz",
    ),
    Mutation(
        "bimodal-fourth-moment",
        "vaelib/bimodal.py",
        "ez4 = m**4 + 6 * m**2 * s**2 + 3 * s**4",
        "ez4 = m**4 + 6 * m**2 * s**2 + s**4",
        "the bimodal closed-form ELBO with a wrong Gaussian fourth moment E_q[z^4]",
    ),
    Mutation(
        "bimodal-kl-direction",
        "vaelib/bimodal.py",
        "return (log_q.exp() * (log_q - log_post)).sum(0) * dz",
        "return (log_post.exp() * (log_post - log_q)).sum(0) * dz",
        "the bimodal KL(q || p(z|x)) by quadrature computes KL(p(z|x) || q) instead",
    ),
    Mutation(
        "bimodal-chi-square",
        "vaelib/bimodal.py",
        "log_ratio = 2 * log_post - q.log_prob(z)  # (grid, batch)",
        "log_ratio = 2 * log_post - 2 * q.log_prob(z)  # (grid, batch)",
        "the bimodal chi-square integrates p^2 / q^2 instead of p^2 / q",
    ),
    Mutation(
        "dreg-single-weight",
        "vaelib/iwae_gradients.py",
        "z.register_hook(lambda grad: grad * w_tilde)",
        "z.register_hook(lambda grad: grad)",
        "DReG's encoder gradient without its second normalized weight: the STL estimator under DReG's name",
    ),
    Mutation(
        "stl-score-kept",
        "vaelib/iwae_gradients.py",
        'q_stopped = stop_gradient(q) if estimator != "reparam" else q',
        "q_stopped = q",
        "STL and DReG without the stopped gradient: the score term of log q stays in",
    ),
    Mutation(
        "renyi-no-scale",
        "vaelib/renyi.py",
        "return (torch.logsumexp(s * log_w, dim=0) - math.log(k)) / s",
        "return torch.logsumexp(s * log_w, dim=0) - math.log(k)",
        "the Renyi bound without its factor 1 / (1 - alpha)",
    ),
    Mutation(
        "rate-kl-reversed",
        "vaelib/rate_distortion.py",
        "rate = kl_divergence(q_parts, p_parts)  # (batch, z_dim) or (batch,)",
        "rate = kl_divergence(p_parts, q_parts)  # (batch, z_dim) or (batch,)",
        "the rate as KL(p(z) || q(z|x)), the KL in the wrong direction",
    ),
    Mutation(
        "free-bits-clamp-reversed",
        "vaelib/rate_distortion.py",
        "below = rate.detach().mean(dim=0) <= free_bits  # (groups,)",
        "below = rate.detach().mean(dim=0) >= free_bits  # (groups,)",
        "free bits that clamp the dimensions above the floor instead of those below it",
    ),
    Mutation(
        "gaps-amortization-sign",
        "vaelib/gaps.py",
        "return self.elbo_optimized - self.elbo_amortized",
        "return self.elbo_amortized - self.elbo_optimized",
        "the amortization gap with its sign flipped: ELBO(q_phi) - ELBO(q*)",
    ),
    Mutation(
        "gaps-log-marginal-no-log-k",
        "vaelib/gaps.py",
        "return total - math.log(k)",
        "return total",
        "log p(x) of the gap split as the log of the sum of the weights, not of their mean",
    ),
)


def check(mutations: Sequence[Mutation], root: Path) -> list[str]:
    """The problems with ``mutations`` against the source under ``root``: duplicates, missing or repeated text."""
    problems = []
    names = [m.name for m in mutations]
    problems += [f"{n}: the name is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutations:
        path = root / m.path
        if not path.is_file():
            problems.append(f"{m.name}: no file {m.path}")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            problems.append(f"{m.name}: the original text occurs {count} times in {m.path} (expected once)")
        if m.original == m.replacement:
            problems.append(f"{m.name}: the replacement equals the original")
    return problems


def apply(mutation: Mutation, root: Path) -> None:
    """Write the bug into the copy at ``root``; :class:`MutationError` unless the original occurs once."""
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        raise MutationError(f"{mutation.name}: the original text occurs {count} times in {mutation.path}")
    path.write_text(text.replace(mutation.original, mutation.replacement))


def copy_repository(root: Path, dest: Path, *, extra: tuple[str, ...] = ()) -> Path:
    """Copy what the notebooks need (``vaelib/``, ``book/``, ``_toc.yml``) and ``extra`` from ``root`` to ``dest``."""
    for name in (*COPIED, *extra):
        source = root / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=_IGNORED)
        elif source.is_file():
            shutil.copy2(source, dest / name)
    return dest


def _guard_cell(copy: Path) -> nbformat.NotebookNode:
    """A first cell that fails unless the kernel imports vaelib from the copy."""
    expected = str((copy / "vaelib").resolve())
    source = (
        "import os as _os\nimport vaelib as _vaelib\n"
        f"assert _os.path.dirname(_os.path.realpath(_vaelib.__file__)) == {expected!r}, _vaelib.__file__\n"
    )
    return nbformat.v4.new_code_cell(source)


def execute(path: Path, *, timeout: int, kernel: str | None) -> dict[str, Any]:
    """Run one notebook as ``benchmarks.book`` does; on a failure, also name the line that raised."""
    nb = nbformat.read(path, as_version=4)
    options: dict[str, Any] = {"timeout": timeout, "resources": {"metadata": {"path": str(path.parent)}}}
    if kernel is not None:
        options["kernel_name"] = kernel
    start = time.perf_counter()
    status, error, line, check = "ok", None, None, None
    try:
        NotebookClient(nb, **options).execute()
    except CellTimeoutError as err:
        status, error = "timeout", str(err).strip().splitlines()[0]
    except (CellExecutionError, DeadKernelError) as err:
        lines = [x for x in _ANSI.sub("", str(err)).strip().splitlines() if x.strip()]
        status, error = "error", lines[-1].strip() if lines else type(err).__name__
        arrows = [x for x in lines if x.lstrip().startswith("---->")]
        # "----> 4 assert ...": drop the arrow and the line number
        line = re.sub(r"^\s*---->\s*\d*\s*", "", arrows[-1]) if arrows else None
        # the failing cell's source sits between the first two rules of dashes
        parts = _ANSI.sub("", str(err)).split("------------------")
        source = parts[1] if len(parts) > 2 else ""
        check = next((x.strip() for x in source.splitlines() if x.strip().startswith("# Check")), None)
    seconds = round(time.perf_counter() - start, 2)
    return {"seconds": seconds, "status": status, "error": error, "line": line, "check": check}


def run_chapters(copy: Path, chapters: list[str], *, timeout: int, kernel: str | None, stop: bool) -> list[dict]:
    """Execute ``chapters`` (paths relative to ``copy``) in order; stop at the first failure if ``stop``."""
    rows = []
    for chapter in chapters:
        path = copy / chapter
        nb = nbformat.read(path, as_version=4)
        nb.cells.insert(0, _guard_cell(copy))
        nbformat.write(nb, path)
        result = execute(path, timeout=timeout, kernel=kernel)
        rows.append({"chapter": Path(chapter).stem, **result})
        if stop and result["status"] != "ok":
            break
    return rows


def _environment(copy: Path) -> dict[str, str | None]:
    """Set the variables every kernel inherits; return the previous values."""
    values = {**book.ENVIRONMENT, "PYTHONPATH": str(copy)}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return old


def _restore(old: dict[str, str | None]) -> None:
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_one(
    mutation: Mutation | None,
    root: Path,
    chapters: list[str],
    *,
    timeout: int,
    kernel: str | None,
    all_chapters: bool,
) -> list[dict]:
    """Copy ``root``, apply ``mutation`` (``None``: the baseline) and run the chapters against the copy."""
    with tempfile.TemporaryDirectory(prefix="vaelib-mutant-") as tmp:
        copy = copy_repository(root, Path(tmp).resolve())
        if mutation is not None:
            apply(mutation, copy)
        old = _environment(copy)
        try:
            return run_chapters(copy, chapters, timeout=timeout, kernel=kernel, stop=not all_chapters)
        finally:
            _restore(old)


def unit_test_files(mutation: Mutation, root: Path) -> list[str]:
    """The unit tests that mirror the mutated module: ``vaelib/toy.py`` is tested by ``tests/test_toy.py``."""
    candidate = f"tests/test_{Path(mutation.path).stem}.py"
    return [candidate] if (root / candidate).is_file() else []


def run_unit_tests(mutation: Mutation, root: Path, *, timeout: int) -> dict[str, Any]:
    """Run the mutated module's own unit tests (not slow, not browser) against a mutated copy of ``root``."""
    files = unit_test_files(mutation, root)
    if not files:
        return {"files": [], "caught": None, "status": "no tests"}
    with tempfile.TemporaryDirectory(prefix="vaelib-mutant-") as tmp:
        copy = Path(tmp).resolve()
        copy_repository(root, copy, extra=("tests", "benchmarks", "pyproject.toml"))
        apply(mutation, copy)
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        command += ["-m", "not slow and not browser", *files]
        env = {**os.environ, **book.ENVIRONMENT, "PYTHONPATH": str(copy)}
        try:
            done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"files": files, "caught": None, "status": "timeout"}
    status = {0: "passed", 1: "failed"}.get(done.returncode, f"pytest exit {done.returncode}")
    return {"files": files, "caught": done.returncode == 1, "status": status}


def _failing(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["status"] != "ok"), None)


def run(
    mutations: Sequence[Mutation],
    *,
    root: Path,
    chapters: list[str],
    timeout: int,
    kernel: str | None = None,
    all_chapters: bool = False,
    baseline: bool = True,
    unit_tests: bool = False,
) -> dict[str, Any]:
    """Run every mutant against ``chapters`` and return the record's figures."""
    problems = check(mutations, root)
    if problems:
        raise MutationError("; ".join(problems))
    start = time.perf_counter()
    figures: dict[str, Any] = {"chapters": [Path(c).stem for c in chapters], "all_chapters": all_chapters}
    if baseline:
        rows = run_one(None, root, chapters, timeout=timeout, kernel=kernel, all_chapters=True)
        figures["baseline"] = rows
        failed = [r["chapter"] for r in rows if r["status"] != "ok"]
        print(f"baseline: {len(rows)} chapters, {'failed: ' + ', '.join(failed) if failed else 'all pass'}", flush=True)
        if failed:
            raise MutationError(f"the unmutated book fails in {', '.join(failed)}: fix it before mutating")
    results = []
    for n, mutation in enumerate(mutations, 1):
        t0 = time.perf_counter()
        rows = run_one(mutation, root, chapters, timeout=timeout, kernel=kernel, all_chapters=all_chapters)
        first = _failing(rows)
        result = {
            **asdict(mutation),
            "caught_by": first["chapter"] if first else None,
            "caught_by_check": bool(first and (first["error"] or "").startswith("AssertionError")),
            "error": first["error"] if first else None,
            "line": first["line"] if first else None,
            "check": first["check"] if first else None,
            "failing_chapters": [r["chapter"] for r in rows if r["status"] != "ok"],
            "chapters_run": [{"chapter": r["chapter"], "status": r["status"], "seconds": r["seconds"]} for r in rows],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if unit_tests:
            result["unit_tests"] = run_unit_tests(mutation, root, timeout=timeout)
        results.append(result)
        where = first["check"] or first["line"] or first["error"] if first else None
        verdict = f"caught by {first['chapter']}: {where}" if first else "NOT CAUGHT"
        if unit_tests:
            verdict += f"; unit tests: {result['unit_tests']['status']}"
        print(f"[{n}/{len(mutations)}] {mutation.name}: {verdict}, {result['seconds']:.0f} s", flush=True)
    figures.update(
        {
            "mutations": results,
            "total": len(results),
            "caught": sum(r["caught_by"] is not None for r in results),
            "uncaught": [r["name"] for r in results if r["caught_by"] is None],
            "timeout_s": timeout,
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return figures


def select_chapters(root: Path, wanted: list[str] | None) -> list[str]:
    """The notebooks of ``root/_toc.yml`` in book order, as paths relative to ``root``, narrowed to ``wanted``."""
    paths, _ = book.notebooks(root / "_toc.yml")
    chapters = [p.relative_to(root).as_posix() for p in paths]
    if not wanted:
        return chapters
    unknown = [w for w in wanted if not any(Path(c).stem == w or c == w for c in chapters)]
    if unknown:
        raise SystemExit(f"--chapters: not in the table of contents: {', '.join(unknown)}")
    return [c for c in chapters if Path(c).stem in wanted or c in wanted]


def main(argv: list[str] | None = None, *, mutations: Sequence[Mutation] = MUTATIONS) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("--chapters", nargs="+", metavar="CHAPTER", help="chapter stems, e.g. 02_jensen")
    parser.add_argument("--all-chapters", action="store_true", help="run every chapter on each mutant")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    parser.add_argument("--kernel", help="kernel name (default: each notebook's own)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated book")
    parser.add_argument(
        "--unit-tests", action="store_true", help="also run the mutated module's unit tests (tests/test_<module>.py)"
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--root", default=str(_record.ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="folder for the JSON record (default benchmarks/results)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if args.list:
        for m in mutations:
            print(f"{m.name:24s} {m.path:22s} {m.description}")
        raise SystemExit(0)
    selected = list(mutations)
    if args.only:
        known = {m.name for m in mutations}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            parser.error(f"--only: unknown mutation {', '.join(unknown)} (see --list)")
        selected = [m for m in mutations if m.name in args.only]
    chapters = select_chapters(root, args.chapters)
    try:
        figures = run(
            selected,
            root=root,
            chapters=chapters,
            timeout=args.timeout,
            kernel=args.kernel,
            all_chapters=args.all_chapters,
            baseline=not args.no_baseline,
            unit_tests=args.unit_tests,
        )
    except MutationError as err:
        print(f"mutation: {err}")
        raise SystemExit(2) from err
    # Notebooks pick their device with vaelib.default_device(); so does the record.
    record, path = _record.write("mutation", figures, default_device(), out=args.out)
    print(
        f"mutation: {figures['caught']} of {figures['total']} bugs caught by a chapter"
        + (f"; not caught: {', '.join(figures['uncaught'])}" if figures["uncaught"] else "")
        + f" -> {path.name}"
    )
    if figures["uncaught"]:
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main()
