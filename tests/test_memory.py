"""reference.memory: glibc keeps freed memory for the next allocation once asked to."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from reference import memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# a fresh process: 96 MiB filled, then freed; prints how many MiB of resident memory the free
# returned to the kernel (glibc serves requests above its mmap threshold, 32 MiB at most by
# default, with an mmap of their own and unmaps it on free)
_RETURNED = textwrap.dedent("""
    import sys
    import numpy as np
    from reference.memory import keep_freed_memory
    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    a = np.ones(96 << 18, np.float32)
    before = rss_mib()
    del a
    print(before - rss_mib())
""")


def _returned_mib(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", _RETURNED, mode], capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory acts on glibc's malloc (Linux) only")
def test_freed_memory_stays_in_the_process():
    assert _returned_mib("default") > 80  # unmapped at once
    assert _returned_mib("keep") < 8  # kept for the next allocation (no fresh pages)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert memory.keep_freed_memory() is False
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.keep_freed_memory() is False
