"""Burda, Grosse and Salakhutdinov (2015), Table 1, one stochastic layer: VAE and IWAE on MNIST.

Five models share one architecture, ``VAE.mlp(784, 50, hidden=(200, 200),
activation="tanh")`` (a 784-200-200-50 encoder, a 50-200-200-784 Bernoulli
decoder), and differ in the training bound: the VAE's ELBO averaged over k
samples (k = 1, 5, 50) or the IWAE bound (k = 5, 50). Each is trained as in
the paper (section 5): dynamic binarization, Adam, batches of 20, and the
schedule of stages i = 0..7 of 3^i passes at learning rate
1e-3 x 10^(-i/7), 3280 passes in all; every stage starts a fresh Adam. Each
model is then scored with ``vaelib.log_likelihood(k=5000)`` on the 10,000 test
images (binarized once, from the seed) and its active units counted
(``vaelib.active_units``, threshold 0.01).

The run is long (hours on one GPU), so it is cut into pieces: every stage of
every model has its own checkpoint, written by ``vaelib.fit`` after each pass
(once a stage is finished, the earlier ones are deleted: at most two
checkpoints of about 5 MB per model); ``--time-budget`` stops starting new
passes when the time is spent, ``--until-stage`` stops after a stage, and
``--resume`` picks up where the last command stopped, on this machine or on
another one the checkpoint folder was copied to. The table is written once
every model has finished.

On a GPU the five models train at the same time, one process each
(``--parallel processes``, the default there): each model has its own random
number generator (``fit`` re-seeds the global one every epoch, which threads
would share) and its own CPU core to launch kernels from (these small networks
are bound by the launch rate, which threads in one process would share under
Python's global interpreter lock). On a CPU they run one after another.
``--devices all`` (or a list such as ``cuda:0,cuda:1``) places the models on
the GPUs of the node, one model per device in turn, so a node with five GPUs
trains the table in the time of its slowest model.

Usage::

    python -m benchmarks.iwae_table --data-dir DIR --time-budget 540          # then again with --resume
    python -m benchmarks.iwae_table --data-dir DIR --devices all              # one model per GPU
    python -m benchmarks.iwae_table --smoke                                   # digits, tiny schedule, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import vaelib
from benchmarks import _record
from vaelib._runtime.devices import resolve_device
from vaelib.training.model_file import read_checkpoint
from vaelib.training.run_folder import read_json, write_json

MODELS = ("vae-k1", "vae-k5", "vae-k50", "iwae-k5", "iwae-k50")
# Burda et al. (2015), Table 1, one stochastic layer: test negative log-likelihood in nats.
PUBLISHED_NLL = {
    ("vae", 1): 86.76,
    ("vae", 5): 86.47,
    ("vae", 50): 86.35,
    ("iwae", 1): 86.76,
    ("iwae", 5): 85.54,
    ("iwae", 50): 84.78,
}
Z_DIM = 50
HIDDEN = (200, 200)
BATCH_SIZE = 20
SMOKE_TRAIN_SIZE = 500
SMOKE_EVAL_K = 50


def schedule(stages: int) -> list[tuple[int, float]]:
    """``(passes, lr)`` of stages 0..stages-1: 3^i passes at 1e-3 x 10^(-i/7) (Burda et al. 2015, section 5)."""
    return [(3**i, 1e-3 * 10 ** (-i / 7)) for i in range(stages)]


@dataclass(frozen=True)
class Spec:
    """One model of the table: the objective (``"vae"`` or ``"iwae"``) and its k."""

    objective: str
    k: int
    index: int

    @property
    def name(self) -> str:
        return f"{self.objective}-k{self.k}"

    @property
    def fit_objective(self) -> vaelib.ELBO | vaelib.IWAE:
        """The objective value the row trains on: the ELBO with k samples (VAE) or the IWAE bound."""
        return vaelib.ELBO(k=self.k) if self.objective == "vae" else vaelib.IWAE(k=self.k)


def spec(name: str) -> Spec:
    if name not in MODELS:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")
    objective, k = name.split("-k")
    return Spec(objective, int(k), MODELS.index(name))


class _OutOfTime(Exception):
    """Raised from fit's callback once the time budget is spent (after that epoch's checkpoint)."""


@dataclass
class Settings:
    smoke: bool
    data_dir: str | None
    device: torch.device
    checkpoint_dir: Path
    stages: int
    until_stage: int | None
    deadline: float | None  # time.time() after which no new pass starts
    seed: int

    def key(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {"smoke": self.smoke, "stages": self.stages, "seed": self.seed, "batch_size": BATCH_SIZE}


def load_data(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images in [0, 1] and the test images binarized once from the seed."""
    if settings.smoke:
        train_x, test_x = vaelib.data.load_digits()
        train_x = train_x[:SMOKE_TRAIN_SIZE]
    else:
        if settings.data_dir is None:
            raise SystemExit("iwae_table: --data-dir DIR (the MNIST IDX files) is needed, or --smoke")
        train_x, test_x = vaelib.data.load_mnist(settings.data_dir)
    test_bin = vaelib.data.binarize(test_x, generator=torch.Generator().manual_seed(settings.seed))
    return train_x, test_bin


def new_model(s: Spec, x_dim: int, seed: int) -> vaelib.VAE:
    torch.manual_seed(seed + 1000 * s.index)
    return vaelib.VAE.mlp(x_dim, Z_DIM, hidden=HIDDEN, activation="tanh", likelihood="bernoulli")


def stage_path(settings: Settings, s: Spec, stage: int) -> Path:
    return settings.checkpoint_dir / f"{s.name}-stage{stage}.pt"


def epochs_done(path: Path) -> int:
    return int(read_checkpoint(path)["epoch"]) if path.is_file() else 0


def _progress_path(settings: Settings, s: Spec) -> Path:
    return settings.checkpoint_dir / f"{s.name}.progress.json"


def _read_progress(settings: Settings, s: Spec) -> dict:
    """Seconds spent in each stage and the stages finished, kept beside the checkpoints."""
    return read_json(_progress_path(settings, s), {"stage_seconds": [0.0] * settings.stages, "stages_done": []})


def train_model(s: Spec, train_x: torch.Tensor, settings: Settings, *, progress: bool | None) -> bool:
    """Train one model through the schedule from its checkpoints; True once every stage is done."""
    plan = schedule(settings.stages)
    last = len(plan) - 1 if settings.until_stage is None else min(settings.until_stage, len(plan) - 1)
    vae = new_model(s, train_x.shape[1], settings.seed)
    record = _read_progress(settings, s)

    def out_of_time(_history: vaelib.History) -> None:
        if settings.deadline is not None and time.time() >= settings.deadline:
            raise _OutOfTime

    for stage in range(last + 1):
        passes, lr = plan[stage]
        path = stage_path(settings, s, stage)
        if stage in record["stages_done"]:
            continue
        if settings.deadline is not None and time.time() >= settings.deadline:
            return False
        if stage > 0:  # start from where the previous stage ended
            vae.load_state_dict(vaelib.load(stage_path(settings, s, stage - 1)).state_dict())
        start = time.perf_counter()
        try:
            history = vaelib.fit(
                vae,
                train_x,
                objective=s.fit_objective,
                epochs=passes,
                batch_size=BATCH_SIZE,
                lr=lr,
                device=settings.device,
                seed=settings.seed + 1000 * s.index + 1 + stage,
                checkpoint=path,
                if_exists="resume",
                progress=progress,
                callbacks=[out_of_time],
            )
        except _OutOfTime:
            return False
        finally:
            record["stage_seconds"][stage] += time.perf_counter() - start
            write_json(_progress_path(settings, s), record)
        if history.interrupted:
            raise KeyboardInterrupt
        record["stages_done"].append(stage)
        write_json(_progress_path(settings, s), record)
        # Only the last finished stage is needed to go on: at most two
        # checkpoints per model, so a run's folder is small enough to move.
        for earlier in range(stage):
            stage_path(settings, s, earlier).unlink(missing_ok=True)
    return last == len(plan) - 1


def parse_devices(text: str | None) -> list[torch.device] | None:
    """``--devices``: ``all`` (every visible CUDA device) or a comma-separated list; ``None`` if not given."""
    if text is None:
        return None
    if text == "all":
        if not torch.cuda.is_available():
            raise SystemExit("iwae_table: --devices all needs CUDA devices, and none is visible")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    try:
        devices = [resolve_device(name.strip()) for name in text.split(",") if name.strip()]
    except ValueError as err:
        raise SystemExit(f"iwae_table: --devices: {err}") from None
    if not devices:
        raise SystemExit("iwae_table: --devices: expected 'all' or a comma-separated list such as cuda:0,cuda:1")
    return devices


def train_all(
    specs: list[Spec],
    train_x: torch.Tensor,
    settings: Settings,
    *,
    parallel: bool,
    threads: int | None,
    devices: list[torch.device] | None = None,
) -> None:
    """Train every model: one process per model (model i on ``devices[i % len(devices)]``), or one after another."""
    if not parallel:
        for s in specs:
            train_model(s, train_x, settings, progress=None if not settings.smoke else False)
        return
    per_worker = threads or max(1, (os.cpu_count() or 1) // len(specs))
    # Workers start in the repository root: give them absolute paths.
    common = ["--checkpoint-dir", str(settings.checkpoint_dir.resolve())]
    common += ["--stages", str(settings.stages), "--seed", str(settings.seed), "--threads", str(per_worker)]
    if settings.smoke:
        common.append("--smoke")
    if settings.data_dir is not None:
        common += ["--data-dir", str(Path(settings.data_dir).resolve())]
    if settings.until_stage is not None:
        common += ["--until-stage", str(settings.until_stage)]
    if settings.deadline is not None:
        common += ["--deadline", repr(settings.deadline)]
    places = devices or [settings.device]
    workers = []
    for i, s in enumerate(specs):
        device = ["--device", str(places[i % len(places)])]
        command = [sys.executable, "-m", "benchmarks.iwae_table", "--worker", s.name, *device, *common]
        workers.append(subprocess.Popen(command, cwd=_record.ROOT))
    codes = [w.wait() for w in workers]
    failed = [s.name for s, code in zip(specs, codes, strict=True) if code != 0]
    if failed:
        raise SystemExit(f"iwae_table: training failed for {', '.join(failed)} (see the messages above)")


def evaluate(s: Spec, test_x: torch.Tensor, settings: Settings, eval_k: int, batch_size: int | None) -> dict:
    """Test NLL with ``eval_k`` importance samples and active units of a finished model (cached on disk)."""
    cache = settings.checkpoint_dir / f"{s.name}.eval-k{eval_k}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    final = stage_path(settings, s, settings.stages - 1)
    vae = vaelib.load(final, device=settings.device)
    torch.manual_seed(settings.seed)
    log_px, seconds = _record.timed(
        lambda: vaelib.log_likelihood(vae, test_x, k=eval_k, batch_size=batch_size, progress=False), settings.device
    )
    log_px = log_px.double().cpu()
    history = read_checkpoint(final)["history"]
    result = {
        "test_nll": round(-float(log_px.mean()), 3),
        "test_nll_se": round(float(log_px.std() / math.sqrt(log_px.numel())), 3),
        "active_units": vaelib.active_units(vae, test_x, threshold=0.01),
        "eval_seconds": round(seconds, 2),
        "final_train_bound": round(history["train_bound"][-1], 3),
    }
    write_json(cache, result)
    return result


def markdown(record: dict) -> str:
    """The table beside the published numbers."""
    lines = [
        "# Burda et al. (2015), Table 1, one stochastic layer: this run beside the paper",
        "",
        f"Device: {record['device_name']} (`{record['device']}`), torch {record['torch']}, "
        f"commit `{record['commit']}`, {record['date']}.",
        f"Test negative log-likelihood in nats, `vaelib.log_likelihood` with k = {record['eval_k']} "
        f"on {record['test_images']} test images; schedule of {record['passes']} passes.",
        "",
    ]
    if record["smoke"]:
        lines += ["**Smoke run** (8x8 digits, tiny schedule, small k): not comparable with the paper.", ""]
    lines += [
        "| objective | k | test NLL (this run) | test NLL (Burda et al.) | difference | active units | train seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["rows"]:
        published = PUBLISHED_NLL[(row["objective"], row["k"])]
        lines.append(
            f"| {row['objective'].upper()} | {row['k']} | {row['test_nll']:.2f} ± {row['test_nll_se']:.2f} | "
            f"{published:.2f} | {row['test_nll'] - published:+.2f} | {row['active_units']} | "
            f"{row['train_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Training wall time for the whole table: {record['train_seconds_total']:.0f} s "
        f"({record['parallel']}). The paper's IWAE k = 1 row equals its VAE k = 1 row (86.76).",
        "",
    ]
    return "\n".join(lines)


def _status(specs: list[Spec], settings: Settings) -> tuple[bool, list[str]]:
    """Whether every model finished the schedule, and one line per model saying how far it got."""
    plan = schedule(settings.stages)
    total = sum(p for p, _ in plan)
    done_all, lines = True, []
    for s in specs:
        done = _read_progress(settings, s)["stages_done"]
        passes = sum(p if i in done else epochs_done(stage_path(settings, s, i)) for i, (p, _) in enumerate(plan))
        done_all &= passes == total
        lines.append(f"  {s.name}: {passes} of {total} passes")
    return done_all, lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.iwae_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with the four MNIST IDX files")
    parser.add_argument("--smoke", action="store_true", help="8x8 digits, 2 stages (4 passes), k=50: seconds on a CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    parser.add_argument("--checkpoint-dir", help="checkpoints (default runs/iwae_table-<device>[-smoke])")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--until-stage", type=int, help="stop after this stage (0-based) of every model")
    parser.add_argument("--time-budget", type=float, help="seconds after which no new pass starts")
    parser.add_argument("--stages", type=int, help="stages of the schedule (default 8: 3280 passes; smoke 2)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument(
        "--parallel",
        choices=("auto", "none", "processes"),
        default="auto",
        help="one process per model (auto: on CUDA) or one model after another",
    )
    parser.add_argument(
        "--devices", help="'all' GPUs of the node or a list such as cuda:0,cuda:1: one model per device, in turn"
    )
    parser.add_argument("--eval-k", type=int, help="importance samples for the test NLL (default 5000; smoke 50)")
    parser.add_argument("--eval-batch-size", type=int, help="test images per pass of log_likelihood")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (per process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the JSON and Markdown records (default benchmarks/results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: train one model in this process
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # internal: time.time() limit
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    stages = args.stages if args.stages is not None else (2 if args.smoke else 8)
    if not 1 <= stages <= 8:
        raise SystemExit(f"iwae_table: --stages expects 1 to 8, got {stages}")
    slug = _record.device_slug(device) + ("-smoke" if args.smoke else "")
    deadline = args.deadline
    if deadline is None and args.time_budget is not None:
        deadline = time.time() + args.time_budget
    settings = Settings(
        smoke=args.smoke,
        data_dir=args.data_dir,
        device=device,
        checkpoint_dir=Path(args.checkpoint_dir or _record.ROOT / "runs" / f"iwae_table-{slug}"),
        stages=stages,
        until_stage=args.until_stage,
        deadline=deadline,
        seed=args.seed,
    )
    if args.worker is not None:
        train_x, _ = load_data(settings)
        train_model(spec(args.worker), train_x, settings, progress=False)
        return None

    specs = [spec(name.strip()) for name in args.models.split(",") if name.strip()]
    settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run_file = settings.checkpoint_dir / "run.json"
    if not args.resume and any(settings.checkpoint_dir.iterdir()):
        raise SystemExit(
            f"iwae_table: {settings.checkpoint_dir} already holds a run; pass --resume to continue it "
            "or choose another --checkpoint-dir"
        )
    run_state = read_json(run_file, {"settings": settings.key(), "train_wall_seconds": 0.0})
    if run_state["settings"] != settings.key():
        raise SystemExit(f"iwae_table: {run_file} was written with other settings: {run_state['settings']}")
    train_x, test_x = load_data(settings)
    parallel = args.parallel == "processes" or (args.parallel == "auto" and device.type == "cuda")
    devices = parse_devices(args.devices)
    if devices is not None and args.parallel == "none":
        raise SystemExit("iwae_table: --devices places one process per model; it cannot go with --parallel none")
    parallel = parallel or devices is not None

    start = time.perf_counter()
    try:
        train_all(specs, train_x, settings, parallel=parallel, threads=args.threads, devices=devices)
    finally:
        run_state["train_wall_seconds"] += time.perf_counter() - start
        write_json(run_file, run_state)
    finished, lines = _status(specs, settings)
    if not finished:
        print("iwae_table: stopped before the end of the schedule; run again with --resume to go on")
        print("\n".join(lines))
        return None

    eval_k = args.eval_k or (SMOKE_EVAL_K if args.smoke else 5000)
    rows = []
    for s in specs:
        stage_seconds = _read_progress(settings, s)["stage_seconds"]
        result = evaluate(s, test_x, settings, eval_k, args.eval_batch_size)
        rows.append(
            {
                "objective": s.objective,
                "k": s.k,
                "layers": 1,
                "test_nll": result["test_nll"],
                "test_nll_se": result["test_nll_se"],
                "active_units": result["active_units"],
                "train_seconds": round(sum(stage_seconds), 1),
                "eval_seconds": result["eval_seconds"],
                "final_train_bound": result["final_train_bound"],
                "published_test_nll": PUBLISHED_NLL[(s.objective, s.k)],
            }
        )
    plan = schedule(stages)
    figures = {
        "smoke": args.smoke,
        "data": "digits (smoke)" if args.smoke else "mnist",
        "train_images": train_x.shape[0],
        "test_images": test_x.shape[0],
        "model": f"VAE.mlp({train_x.shape[1]}, {Z_DIM}, hidden={HIDDEN}, activation='tanh', likelihood='bernoulli')",
        "batch_size": BATCH_SIZE,
        "schedule": [{"stage": i, "passes": p, "lr": lr} for i, (p, lr) in enumerate(plan)],
        "passes": sum(p for p, _ in plan),
        "eval_k": eval_k,
        "active_unit_threshold": 0.01,
        "parallel": "one process per model" if parallel else "one model after another",
        "devices": [str(d) for d in devices] if devices is not None else [str(device)],
        "train_seconds_total": round(run_state["train_wall_seconds"], 1),
        "rows": rows,
    }
    name = "iwae_table-smoke" if args.smoke else "iwae_table"
    record, path = _record.write("iwae_table", figures, device, name=name, out=args.out)
    path.with_suffix(".md").write_text(markdown(record))
    summary = ", ".join(f"{r['objective']} k={r['k']} {r['test_nll']:.2f}" for r in rows)
    seconds = record["train_seconds_total"]
    print(f"iwae_table ({record['device_name']}): test NLL {summary}; training {seconds:.0f} s -> {path.name}")
    return record


if __name__ == "__main__":
    main()
