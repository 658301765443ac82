"""How many CPU threads vaelib's loops use: one, or torch's default, whichever is faster now.

On a CPU, torch splits a matrix product over OpenMP threads. For the small
products of the book's models (a batch of 100 against 128 hidden units) the
threads spend most of a step waiting for each other at the end of every
product, and GNU OpenMP waits by spinning. On a quiet machine two threads
are still about 1.5 times as fast as one; with one more training beside it
(a second notebook, a shared JupyterHub server, a CI runner) the spinning
threads steal each other's cores and a step takes five to ten times as long
as with one thread. The OpenMP wait policy (``OMP_WAIT_POLICY=passive``)
would help too, but GNU OpenMP reads it once, when torch is imported, so a
library cannot set it.

So vaelib's CPU loops (:func:`vaelib.training.fit.fit`'s training steps,
:func:`vaelib.evaluate.log_likelihood`'s passes,
:func:`vaelib.estimators.gradient_samples`) time their own steps with one
thread and with torch's default number, keep the faster, and try the other
now and then, so a run adapts when another one starts or stops beside it.
A machine that becomes busy shows in the steps of the count in use, so
fewer threads are tried only rarely; more threads are tried as often as
their cost allows, since only a try can show that the machine has quietened.
The tries of a slower count cost at most about 5% of the loop's time on a
busy machine and well under 1% on a quiet one (see :class:`StepThreads`).
The math modules reach this policy through one helper, :func:`compute_threads`.
Work too small for torch to split at all (fewer than ``SMALL_WORK``
multiply-adds per product) runs on one thread without timing.
For the book's models the choice does not change the results: one and two
threads train to the same bits (a test checks it).

The caller's choice wins: if ``torch.set_num_threads`` was called (the count
differs from the one torch had when vaelib was imported; a count set before
that import reads as torch's own) or ``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS`` is set, vaelib uses that count as it is. Setting
``VAELIB_CPU_THREADS=torch`` turns the policy off (torch's count is used
throughout, as before). The caller's count is restored when a call returns,
also when it raises.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from vaelib._runtime.thread_policy import cpu_threads, machine_busy, matmul_work, thread_options

__all__ = ["StepThreads", "compute_threads"]

# Seconds of steps on one thread before a busy machine is tried with more.
BUSY_DELAY = 0.5

# What the last loop over the same work found, for the next loop in this
# process within this many seconds: a notebook calls fit again and again,
# and each call would otherwise pay anew for trying a count that is slow.
MEMORY_SECONDS = 60.0
_MEMORY: dict[tuple[tuple[int, ...], int], dict[str, Any]] = {}


class StepThreads:
    """Time a loop's steps with each candidate thread count and run on the faster.

    Use as a context manager around the loop and :meth:`step` around each step::

        with StepThreads(device, work) as threads:
            for xb in batches:
                with threads.step():
                    ...  # one training step

    The first step is an untimed warm-up. Then the candidates take turns
    until each has ``trials`` timed steps, or is clearly slower (its fastest
    step slower than twice another's median); from then on the loop runs on
    the count with the lowest median of its last ``trials`` step times and
    now and then tries another one, so the choice follows the machine's load.
    A try of more threads is at least ``explore_every`` steps after the last
    try, and after at least ``1 / overhead`` times the extra seconds the last
    try cost, so trying a count that is slow on a busy machine costs at most
    about ``overhead`` of the loop's time. A try of fewer threads waits
    ``explore_fewer_every`` steps: when load arrives, the count in use slows
    down and its own times move the choice, so these tries only catch a
    small drift (on a quiet machine each one costs about half a step). A loop over the same work that starts
    within ``MEMORY_SECONDS`` of the last one's end in this process starts
    from what that one measured, and keeps to its waiting time before a try.
    On leaving, the caller's count is restored.

    Parameters
    ----------
    device : torch.device or str
        Only CPU loops are tuned; elsewhere :meth:`step` does nothing.
    work : int
        Multiply-adds per matrix product in a step (:func:`~vaelib._runtime.thread_policy.matmul_work`).
    trials : int
        Timed steps per candidate that make up its estimate.
    explore_every : int
        Fewest steps between two tries of a count that is not the current choice.
    explore_fewer_every : int
        Fewest steps between two tries of fewer threads than the current choice.
    overhead : float
        Share of the loop's time that tries of slower counts may cost.
    """

    def __init__(
        self,
        device: torch.device | str,
        work: int,
        *,
        trials: int = 3,
        explore_every: int = 16,
        explore_fewer_every: int = 256,
        overhead: float = 0.05,
    ) -> None:
        if not isinstance(trials, int) or trials < 1:
            raise ValueError(f"trials: expected a positive int, got {trials!r}")
        if not isinstance(explore_every, int) or explore_every < 1:
            raise ValueError(f"explore_every: expected a positive int, got {explore_every!r}")
        if not isinstance(explore_fewer_every, int) or explore_fewer_every < explore_every:
            raise ValueError(
                f"explore_fewer_every: expected an int of at least explore_every, got {explore_fewer_every!r}"
            )
        if not 0 < overhead < 1:
            raise ValueError(f"overhead: expected a number in (0, 1), got {overhead!r}")
        self.options = thread_options(device, work)
        self.trials = trials
        self.explore_every = explore_every
        self.explore_fewer_every = explore_fewer_every
        self.overhead = overhead
        self.seconds: dict[int, list[float]] = {n: [] for n in self.options}
        self.steps = 0  # steps run, the warm-up included
        self.spent = 0.0  # seconds of timed steps
        self._last_try = 0  # the step of the last try of another count
        self._next_try_at = 0.0  # ``spent`` before which no count is tried
        self._tries = 0
        # On a machine already busy, a spinning second thread is slow to try:
        # start on one thread and try more only after this many seconds of steps.
        self._busy_delay = BUSY_DELAY if machine_busy() else 0.0
        self._next_try_clock = 0.0  # ``time.perf_counter()`` before which no count is tried
        self._key = (self.options, int(work))
        remembered = _MEMORY.get(self._key) if len(self.options) > 1 else None
        if remembered is not None and time.perf_counter() - remembered["stamp"] < MEMORY_SECONDS:
            self.seconds = {n: list(s) for n, s in remembered["seconds"].items()}
            self._next_try_clock = remembered["next_try_clock"]
            self._busy_delay = 0.0
        self._before = torch.get_num_threads()

    def __enter__(self) -> StepThreads:
        self._before = torch.get_num_threads()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.get_num_threads() != self._before:
            torch.set_num_threads(self._before)
        if len(self.options) > 1 and all(self.seconds.values()):
            _MEMORY[self._key] = {
                "seconds": {n: list(s) for n, s in self.seconds.items()},
                "next_try_clock": self._next_try_clock,
                "stamp": time.perf_counter(),
            }

    def record(self, n: int, seconds: float) -> None:
        """Add one step's wall time on ``n`` threads (only the last ``trials`` are kept)."""
        kept = self.seconds[n]
        kept.append(seconds)
        del kept[: -self.trials]
        self.spent += seconds

    def _median(self, n: int) -> float:
        return statistics.median(self.seconds[n]) if self.seconds[n] else math.inf

    def _settled(self, n: int) -> bool:
        """Whether ``n`` has enough timed steps, or is clearly slower than another count."""
        if len(self.seconds[n]) >= self.trials:
            return True
        if not self.seconds[n]:
            return False
        return any(min(self.seconds[n]) > 2 * self._median(m) for m in self.options if m != n)

    def choice(self) -> int:
        """The count with the lowest median step time (the first candidate until all are timed)."""
        if not self.options:
            return torch.get_num_threads()
        if not all(self.seconds[n] for n in self.options):
            return self.options[0]
        return min(self.options, key=self._median)

    def next_threads(self) -> int:
        """The count for the next step: the candidates in turn until settled, then :meth:`choice` or a try."""
        if len(self.options) < 2:
            return self.options[0] if self.options else torch.get_num_threads()
        if self.steps == 0:
            return self.options[0]  # the warm-up
        waiting = self.spent < self._next_try_at or time.perf_counter() < self._next_try_clock
        if waiting and all(self.seconds.values()):
            return self.choice()
        if self.spent < self._busy_delay:
            return self.options[0]  # the machine was busy: one thread for a while
        unsettled = [n for n in self.options if not self._settled(n)]
        if unsettled:
            return min(unsettled, key=lambda n: len(self.seconds[n]))
        best = self.choice()
        if self.spent < self._next_try_at:
            return best
        since = self.steps - self._last_try
        others = [n for n in self.options if n != best]
        other = others[self._tries % len(others)]
        every = self.explore_every if other > best else self.explore_fewer_every
        return other if since >= every else best

    @contextlib.contextmanager
    def step(self) -> Iterator[int]:
        """Run one step on the count from :meth:`next_threads` and time it. Yields the count."""
        if not self.options:
            yield torch.get_num_threads()
            return
        n = self.next_threads()
        settled = all(self._settled(m) for m in self.options)
        best = self.choice()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        start = time.perf_counter()
        yield n
        elapsed = time.perf_counter() - start
        self.steps += 1
        if len(self.options) < 2 or self.steps == 1:
            return  # nothing to choose, or the warm-up
        if settled and n != best:
            self._tries += 1
        self.record(n, elapsed)
        best = self.choice()
        if n != best and all(self.seconds.values()):
            # A slower count was tried: wait until its extra cost is a small share of the time.
            self._last_try = self.steps
            extra = max(elapsed - self._median(best), 0.0)
            self._next_try_at = max(self._next_try_at, self.spent + extra / self.overhead)
            self._next_try_clock = max(self._next_try_clock, time.perf_counter() + extra / self.overhead)


@contextlib.contextmanager
def compute_threads(
    device: torch.device | str, model: object, rows: int, *, once: bool = False
) -> Iterator[Callable[[], AbstractContextManager[int]]]:
    """The CPU thread policy for a loop of passes of ``rows`` rows through ``model`` on ``device``.

    The one entry point of the math modules into this policy. Yields ``step``:
    run each step of the loop under ``with step():`` and the steps are timed
    with one thread and with torch's count, and run on the faster
    (:class:`StepThreads`)::

        with compute_threads(x.device, model, k * batch) as step:
            for xb in batches:
                with step():
                    ...  # one step

    With ``once=True`` the block is one piece of work that cannot be timed step
    by step: it runs on one thread if the work is small, else on torch's count
    (:func:`~vaelib._runtime.thread_policy.cpu_threads`), and ``step()`` does nothing. Either way the
    caller's count is restored on the way out.

    Parameters
    ----------
    device : torch.device or str
        Only CPU work is tuned.
    model : object
        The model the rows pass through; its largest matrix product sets the work
        (:func:`~vaelib._runtime.thread_policy.matmul_work`).
    rows : int
        Rows of one pass (a batch, times the samples per data point).
    once : bool
        One untimed block rather than a loop of timed steps.
    """
    work = matmul_work(model, rows)
    if once:
        with cpu_threads(device, work) as n:
            yield lambda: contextlib.nullcontext(n)
        return
    with StepThreads(device, work) as threads:
        yield threads.step
