"""The CPU thread policy: the caller's count respected and restored, small work on one thread, adaptive choice."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal

import vaelib
from vaelib._runtime import thread_policy, threads
from vaelib.estimators import gradient_samples

DEFAULT = 2  # the count torch "started with" in these tests, whatever the machine has


@pytest.fixture
def policy(monkeypatch):
    """The policy as a reader meets it: no thread variables, torch at its starting count, an idle machine."""
    for name in (*thread_policy.THREAD_VARIABLES, thread_policy.POLICY_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(thread_policy, "_TORCH_DEFAULT", DEFAULT)
    monkeypatch.setattr(threads, "machine_busy", lambda: False)
    monkeypatch.setattr(threads, "_MEMORY", {})
    before = torch.get_num_threads()
    torch.set_num_threads(DEFAULT)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    x, _ = vaelib.data.load_digits()
    return x[:200]


def _small_vae() -> vaelib.VAE:
    """A model whose products are below SMALL_WORK at batch 20: the policy runs it on one thread."""
    torch.manual_seed(0)
    return vaelib.VAE.mlp(64, 2, hidden=(16,))


def _large_vae() -> vaelib.VAE:
    torch.manual_seed(0)
    return vaelib.VAE.mlp(64, 8, hidden=(128, 128))


def test_options_for_small_and_large_work(policy):
    """Small work gets one thread without timing; large work times one thread against torch's count."""
    assert thread_policy.thread_options("cpu", thread_policy.SMALL_WORK - 1) == (1,)
    assert thread_policy.thread_options("cpu", thread_policy.SMALL_WORK) == (1, DEFAULT)
    assert thread_policy.thread_options("cpu", 10**9) == (1, DEFAULT)


def test_book_models_are_large_and_toys_small():
    """The book's training model is timed at batch 100; the linear-Gaussian toy is small."""
    assert thread_policy.matmul_work(_large_vae(), 100) == 100 * 128 * 128 >= thread_policy.SMALL_WORK
    toy = vaelib.LinearGaussian.random(x_dim=3, z_dim=2, noise_std=0.5, seed=1)
    assert thread_policy.matmul_work(toy, 1000) == 1000 * 3 * 2 < thread_policy.SMALL_WORK


def test_no_options_off_the_cpu_or_when_turned_off(policy, monkeypatch):
    """Another device, or VAELIB_CPU_THREADS=torch, leaves the count alone."""
    assert thread_policy.thread_options("meta", 10**9) == ()
    monkeypatch.setenv(thread_policy.POLICY_VARIABLE, "torch")
    assert thread_policy.thread_options("cpu", 10**9) == ()


@pytest.mark.parametrize("how", ["set_num_threads", "OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_an_explicit_count_is_respected(policy, monkeypatch, digits, how):
    """A count the caller set is used as it is, even for work the policy would put on one thread."""
    if how == "set_num_threads":
        torch.set_num_threads(DEFAULT + 1)
    else:
        monkeypatch.setenv(how, str(DEFAULT))
    expected = torch.get_num_threads()
    assert thread_policy.caller_chose_threads()
    assert thread_policy.thread_options("cpu", 1) == ()
    seen = []
    vaelib.fit(
        _small_vae(),
        digits,
        epochs=2,
        batch_size=20,
        device="cpu",
        callbacks=[lambda h: seen.append(torch.get_num_threads())],
    )
    assert seen == [expected, expected]
    assert torch.get_num_threads() == expected


def test_fit_uses_the_policy_and_restores_the_count(policy, digits):
    """Small work trains on one thread; afterwards the caller's count is back."""
    seen = []
    vaelib.fit(
        _small_vae(),
        digits,
        epochs=2,
        batch_size=20,
        device="cpu",
        callbacks=[lambda h: seen.append(torch.get_num_threads())],
    )
    assert seen == [1, 1]
    assert torch.get_num_threads() == DEFAULT


def test_fit_restores_the_count_after_an_exception(policy, digits):
    """An error raised mid-run (here by the callback) still restores the caller's count."""

    def fail(history):
        assert torch.get_num_threads() == 1
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        vaelib.fit(_small_vae(), digits, epochs=3, batch_size=20, device="cpu", callbacks=[fail])
    assert torch.get_num_threads() == DEFAULT


def test_log_likelihood_restores_the_count(policy, digits, monkeypatch):
    """log_likelihood runs its passes under the policy and restores the count, also after an error."""
    vae = _large_vae()
    seen = []
    log_joint = vae.log_joint

    def spy(x, z):
        seen.append(torch.get_num_threads())
        return log_joint(x, z)

    monkeypatch.setattr(vae, "log_joint", spy)
    vaelib.log_likelihood(vae, digits, k=20, batch_size=20, binarize=True, progress=False)
    assert torch.get_num_threads() == DEFAULT
    assert set(seen) == {1, DEFAULT}  # both counts were timed

    def broken(x, z):
        raise RuntimeError("broken")

    monkeypatch.setattr(vae, "log_joint", broken)
    with pytest.raises(RuntimeError, match="broken"):
        vaelib.log_likelihood(vae, digits, k=20, batch_size=20, binarize=True, progress=False)
    assert torch.get_num_threads() == DEFAULT


def test_gradient_samples_restore_the_count(policy, toy, toy_data):
    """The estimator helpers restore the count, batched or not; the toy's work runs on one thread."""
    loc = torch.zeros(toy_data.shape[0], toy.z_dim, dtype=torch.float64, requires_grad=True)
    seen = []

    def make_q(loc):
        seen.append(torch.get_num_threads())
        return Independent(Normal(loc, torch.ones_like(loc)), 1)

    for batched in (False, True):
        gradient_samples(toy_data, [loc], make_q, toy, estimator="reparam", n=5, batched=batched)
        assert torch.get_num_threads() == DEFAULT
    assert set(seen) == {1}


def test_cpu_threads_restores_after_an_error(policy):
    """The one-off context manager restores the count when its block raises."""
    with pytest.raises(KeyError), thread_policy.cpu_threads("cpu", 1) as n:
        assert n == 1 == torch.get_num_threads()
        raise KeyError("x")
    assert torch.get_num_threads() == DEFAULT
    with thread_policy.cpu_threads("cpu", 10**9) as n:
        assert n == DEFAULT  # large one-off work keeps torch's count


def _run(
    step_seconds: dict[int, float], steps: int, monkeypatch, clock: list[float] | None = None
) -> tuple[threads.StepThreads, dict[int, int]]:
    """Drive StepThreads with a fake clock on which a step on n threads takes ``step_seconds[n]``."""
    clock = [0.0] if clock is None else clock
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])
    counts = {n: 0 for n in step_seconds}
    with threads.StepThreads("cpu", 10**9) as tuner:
        for _ in range(steps):
            with tuner.step() as n:
                assert torch.get_num_threads() == n
                clock[0] += step_seconds[n]
                counts[n] += 1
    return tuner, counts


def test_quiet_machine_chooses_more_threads(policy, monkeypatch):
    """When torch's count is faster, nearly every step runs on it."""
    tuner, counts = _run({1: 1.5e-3, DEFAULT: 1.0e-3}, 2000, monkeypatch)
    assert tuner.choice() == DEFAULT
    assert torch.get_num_threads() == DEFAULT
    # The three timed steps of the start, then a try of one thread every
    # explore_fewer_every steps: well under 1% of the steps.
    assert 2000 // tuner.explore_fewer_every <= counts[1] - 3 <= 2000 // tuner.explore_fewer_every + 1


def test_a_small_drift_towards_fewer_threads_is_found(policy, monkeypatch):
    """Steps on torch's count slow a little, but not past one thread's old time: the rare tries find the switch."""
    clock = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])
    with threads.StepThreads("cpu", 10**9) as tuner:
        for i in range(1000):
            drifted = i >= 200
            with tuner.step() as n:
                if n > 1:
                    clock[0] += 1.4e-3 if drifted else 1.0e-3
                else:
                    clock[0] += 1.1e-3 if drifted else 1.5e-3
            if i == 199:
                assert tuner.choice() == DEFAULT
    assert tuner.choice() == 1


def test_busy_machine_chooses_one_thread_and_bounds_the_tries(policy, monkeypatch):
    """When the second thread is 50 times slower, one thread wins and the tries cost about 5% at most."""
    slow, fast = 50e-3, 1e-3
    tuner, counts = _run({1: fast, DEFAULT: slow}, 2000, monkeypatch)
    assert tuner.choice() == 1
    extra = counts[DEFAULT] * (slow - fast)
    total = counts[1] * fast + counts[DEFAULT] * slow
    assert counts[DEFAULT] >= 2  # it did try again
    assert extra <= 0.06 * total + slow  # the first try is paid before any budget exists


def test_the_choice_follows_a_change_of_load(policy, monkeypatch):
    """A machine that becomes busy mid-loop moves the loop to one thread within a few tries."""
    clock = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])
    with threads.StepThreads("cpu", 10**9) as tuner:
        for i in range(600):
            busy = i >= 200
            with tuner.step() as n:
                clock[0] += (20e-3 if n > 1 else 1.2e-3) if busy else (1e-3 if n > 1 else 1.5e-3)
            if i == 199:
                assert tuner.choice() == DEFAULT
    assert tuner.choice() == 1


def test_busy_machine_starts_on_one_thread(policy, monkeypatch):
    """On a machine whose load already fills the CPUs, the first half second of steps runs on one thread."""
    monkeypatch.setattr(threads, "machine_busy", lambda: True)
    _, counts = _run({1: 1e-3, DEFAULT: 0.5e-3}, 2000, monkeypatch)
    assert counts[1] >= threads.BUSY_DELAY / 1e-3 - 1
    assert counts[DEFAULT] > 1000  # more threads are tried afterwards, and win


def test_step_threads_argument_errors():
    with pytest.raises(ValueError, match="trials"):
        threads.StepThreads("cpu", 1, trials=0)
    with pytest.raises(ValueError, match="explore_fewer_every"):
        threads.StepThreads("cpu", 1, explore_every=16, explore_fewer_every=8)
    with pytest.raises(ValueError, match="overhead"):
        threads.StepThreads("cpu", 1, overhead=1.5)


def test_the_thread_count_does_not_change_the_result(digits):
    """Training the book's model on one thread and on two ends with the same weights, bit for bit."""
    weights = []
    for n in (1, 2):
        torch.set_num_threads(n)  # an explicit count: the policy leaves it alone
        vae = _large_vae()
        vaelib.fit(vae, digits, epochs=2, batch_size=100, device="cpu")
        weights.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_the_next_loop_remembers_a_slow_count(policy, monkeypatch):
    """A second loop over the same work starts from the first one's times and does not try the slow count at once."""
    slow, fast, clock = 50e-3, 1e-3, [0.0]
    _, first = _run({1: fast, DEFAULT: slow}, 200, monkeypatch, clock)
    assert first[DEFAULT] >= 1
    clock[0] += 0.1  # the notebook's next cell
    _, second = _run({1: fast, DEFAULT: slow}, 50, monkeypatch, clock)
    assert second[DEFAULT] == 0
    clock[0] += threads.MEMORY_SECONDS
    _, third = _run({1: fast, DEFAULT: slow}, 50, monkeypatch, clock)
    assert third[DEFAULT] >= 1  # a minute later it times both counts afresh
