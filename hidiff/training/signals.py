"""How a training run stops early: on SIGINT (Ctrl-C) or SIGTERM (``kill``, a job scheduler),
cleanly; on a non-finite loss, with :class:`TrainingDiverged`.

While :class:`StopSignals` is active, the first SIGINT or SIGTERM only sets a flag: the running
iteration completes, the training loop sees the flag before the next one, writes a checkpoint of
the last completed step and raises :class:`TrainingInterrupted`. A second signal of the same kind
acts at once, as it would without the handler. SIGKILL cannot be caught: a killed run resumes
from its last periodic checkpoint (``--resume``; before the first one, ``--resume`` starts it
again from step 0).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["StopSignals", "TrainingDiverged", "TrainingInterrupted"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after writing its checkpoint; ``signum``, ``step``, ``out``."""

    def __init__(self, signum: int, step: int, out: Path) -> None:
        self.signum, self.step, self.out = signum, step, Path(out)
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint written to "
                         f"{self.out / 'checkpoint.pt'} (continue with --resume)")


class TrainingDiverged(FloatingPointError):
    """A loss became NaN or infinite at ``step``; nothing of that step is saved. ``kept``: the
    step of the run's last checkpoint in ``out`` (None: the run had none and left nothing)."""

    def __init__(self, step: int, losses: dict[str, float], lr: float, out: Path,
                 kept: int | None) -> None:
        self.step, self.losses, self.out, self.kept = step, dict(losses), Path(out), kept
        shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        super().__init__(
            f"training diverged: non-finite loss at step {step} ({shown}); lower --lr (it was "
            f"{lr:g}) or keep --grad-clip on; "
            + (f"{self.out / 'checkpoint.pt'} still holds step {kept}" if kept is not None
               else "no checkpoint had been written, so nothing was kept"))


class StopSignals:
    """Context manager: SIGINT / SIGTERM set :attr:`received` (the signal number) instead of
    stopping the process. Only installs handlers in the main thread (Python's rule)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        signal.signal(signum, self._restore(signum))  # a second one acts at once

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _restore(self, sig: int) -> Any:
        previous = self._previous.get(sig)
        return signal.SIG_DFL if previous is None else previous  # None: set from C

    def __exit__(self, *exc: object) -> None:
        for sig in list(self._previous):
            signal.signal(sig, self._restore(sig))
        self._previous.clear()
