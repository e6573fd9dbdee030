"""The native passes' worker threads (``edge_runtime/_packed/parallel.c``).

Splitting a pass over 1 to 7 threads changes no bit (more threads than the machine has cores
included: the split is by rows, each row computed as on one thread); Python threads calling the
kernels at the same time get what each would get alone (one call uses the workers, the others
run on their own thread); a process forked after the workers started runs threaded calls in
the child without waiting on workers that did not survive the fork.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import _packed
from edge_runtime import packed as K


def _inputs(seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 48, 40, 32)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0.0
    w = rng.standard_normal((32, 48)).astype(np.float32)
    conv_w = np.where(rng.random((32, 32, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    return x, w, conv_w


#: a 3 x 3 shifted sum of a 9-channel map (large enough to split: at least ~64 K terms a thread)
TERMS = np.array([[3 * dy + dx, dy, dx] for dy in range(3) for dx in range(3)], np.int32)


def _all_passes(x, w, conv_w, threads: int) -> list[np.ndarray]:
    taps = np.ascontiguousarray(np.resize(x, (2, 256, 64, 9)))
    layer = K.PackedBinaryConv(conv_w, padding=1, threads=threads,
                               scale=np.linspace(0.5, 2, 32, dtype=np.float32))
    return [
        _packed.pointwise(x, w, threads=threads),
        _packed.ew_chain(x, b"ma", (x, x[:1]), threads=threads),
        layer(K.pack_nhwc(x)),
        _packed.shifted_sum(taps, TERMS, np.zeros(len(TERMS), np.float32), 1, 1, 256, 64,
                            threads=threads),
    ]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(u.view(np.uint32), v.view(np.uint32)) for u, v in zip(a, b,
                                                                                     strict=True))


def test_any_thread_count_gives_the_same_bits():
    x, w, conv_w = _inputs()
    one = _all_passes(x, w, conv_w, 1)
    for threads in (2, 3, 4, 7):
        assert _same(_all_passes(x, w, conv_w, threads), one), threads


def test_concurrent_callers_get_their_own_results():
    inputs = [_inputs(seed) for seed in range(3)]
    want = [_all_passes(*args, 1) for args in inputs]
    failures: list[str] = []

    def work(k: int) -> None:
        for _ in range(15):
            if not _same(_all_passes(*inputs[k], 2), want[k]):
                failures.append(f"caller {k}")
                return

    callers = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in callers), "a caller hung"
    assert not failures


_FORK_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from test_parallel import _all_passes, _inputs, _same
x, w, conv_w = _inputs()
one = _all_passes(x, w, conv_w, 1)
assert _same(_all_passes(x, w, conv_w, 2), one)  # the parent's workers are running now
for _ in range(20):  # a new worker must not run the parent's last chunk: a race, so repeat
    pid = os.fork()
    if pid == 0:  # the child: its own workers, the same bits
        os._exit(0 if _same(_all_passes(x, w, conv_w, 2), one) else 3)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_starts_its_own_workers():
    """In a fresh interpreter (the test process may hold other libraries' threads, which a
    fork does not take along either): parent and forked child both run threaded passes."""
    script = _FORK_SCRIPT.format(tests=str(Path(__file__).parent))
    try:
        done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True,
                              text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("a threaded call hung after the fork")
    assert done.returncode == 0, done.stderr
