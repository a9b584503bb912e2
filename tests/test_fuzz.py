"""Thousands of random, mostly malformed argument sets to every op, each ending in a Python exception or a result.

The cases run in child processes (fuzz_cases.py), so that a crash (a signal: SIGSEGV, SIGABRT) fails the test with
the case that caused it instead of killing pytest. Seeded: a failure names the seed and case, which replays alone.
"""

import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "fuzz_cases.py")
SEED = 20240605
CASES = {"forward": 1200, "backward": 800, "lstm": 600, "cell": 500}


def run_child(target: str, seed: int, count: int, *extra: str) -> subprocess.CompletedProcess:
    # The caller's PYTHONPATH first: `make sanitize` points it at the sanitizer build, which the child must load.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.environ.get("PYTHONPATH", ""), os.path.dirname(HERE), HERE]))
    return subprocess.run([sys.executable, CHILD, target, str(seed), str(count), *extra], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def assert_clean(run: subprocess.CompletedProcess, target: str, seed: int, count: int) -> None:
    """The child must exit 0 after every case: a signal, an escaped exception or a missing summary fails."""
    lines = run.stdout.splitlines()
    last = " / ".join(lines[-2:]) if lines else "(no output)"
    if run.returncode < 0:
        name = signal.Signals(-run.returncode).name
        raise AssertionError(f"{target}: the child died of {name} at {last!r} (seed {seed}; replay with "
                             f"python tests/fuzz_cases.py {target} {seed} 1 --first N)")  # fmt: skip
    assert run.returncode == 0, f"{target}: the child exited {run.returncode} at {last!r}:\n{run.stderr[-3000:]}"
    summary = lines[-1] if lines else ""
    assert summary.startswith("done: ") and sum(int(w) for w in summary.split() if w.isdigit()) == count, last


@pytest.mark.parametrize("target", sorted(CASES))
def test_fuzz_never_crashes(target):
    run = run_child(target, SEED, CASES[target])
    assert_clean(run, target, SEED, CASES[target])
    returned = int(run.stdout.splitlines()[-1].split()[1])
    assert returned > CASES[target] // 20, "the generator should also make valid calls, not only malformed ones"


def test_harness_reports_a_crash():
    """The harness itself can fail: a child that aborts at case 3 is reported with the signal and the case."""
    run = run_child("forward", SEED, 10, "--abort-at", "3")
    with pytest.raises(AssertionError, match=r"SIGABRT at '.* / case 3'"):
        assert_clean(run, "forward", SEED, 10)


def test_harness_reports_an_unfinished_run():
    """A child that stops early without a signal (here: told to run fewer cases than expected) fails too."""
    run = run_child("forward", SEED, 5)
    with pytest.raises(AssertionError):
        assert_clean(run, "forward", SEED, 6)
