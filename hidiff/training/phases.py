"""Which phase an iteration belongs to, and the segmentor's learning rate for it.

A run goes through pre-training (the segmentor alone), alternating training and, when
``refine_after_steps`` / ``refine_after_minutes`` is given, the refiner alone with the segmentor
frozen, in that order and never back within one :func:`hidiff.training.train` call. The clocks
are rank 0's: every decision is broadcast, so DDP replicas agree on the phase and the rate.
"""

from __future__ import annotations

import torch

from hidiff.training.distributed import DistContext, broadcast_object
from hidiff.training.lr_schedule import lr_factor, segmentor_ends
from hidiff.training.setup import TrainArgs

__all__ = ["PhaseTracker"]


class PhaseTracker:
    """The phase of each iteration of one ``train`` call (see the module docstring)."""

    def __init__(self, args: TrainArgs, ctx: DistContext) -> None:
        self.args, self.ctx = args, ctx
        self.alternating = False  # set once the alternating phase has begun (pretrain_minutes)
        self.refining = False  # set once the refiner-alone phase has begun

    def phase(self, step: int, elapsed_s: float) -> str:
        """``"refine"`` once ``refine_after_steps`` / ``refine_after_minutes`` is reached (it
        ends any pre-training), else ``"pretrain"`` or ``"alternate"``; ``step``: completed
        iterations, ``elapsed_s``: the run's training seconds (resumed time included)."""
        args = self.args
        if not self.refining and (args.refine_after_steps is not None
                                  or args.refine_after_minutes is not None):
            due = (args.refine_after_steps is not None and step >= args.refine_after_steps) or (
                args.refine_after_minutes is not None
                and elapsed_s >= 60.0 * args.refine_after_minutes)
            self.refining = bool(broadcast_object(due, self.ctx))
        if self.refining:
            return "refine"
        return "pretrain" if self._pretraining(step, elapsed_s) else "alternate"

    def _pretraining(self, step: int, elapsed_s: float) -> bool:
        """Segmentor-only while ``step < pretrain_steps`` or, with ``pretrain_minutes``, while
        the run's training time is under it; never again once the alternating phase began."""
        args = self.args
        if step < args.pretrain_steps:
            return True
        if not args.pretrain_minutes or self.alternating:
            return False
        pretrain = bool(broadcast_object(elapsed_s < 60.0 * args.pretrain_minutes, self.ctx))
        self.alternating = not pretrain
        return pretrain

    def set_segmentor_lr(self, optimizer: torch.optim.Optimizer, *, step: int,
                         elapsed_s: float) -> None:
        """Set the segmentor's learning rate for the next iteration (``segmentor_schedule``),
        ``step`` iterations and ``elapsed_s`` training seconds into the run."""
        args = self.args
        end_steps, end_s = segmentor_ends(
            max_steps=args.max_steps, max_minutes=args.max_minutes,
            refine_after_steps=args.refine_after_steps,
            refine_after_minutes=args.refine_after_minutes)
        factor = lr_factor(args.segmentor_schedule, step=step, elapsed_s=elapsed_s,
                           end_steps=end_steps, end_s=end_s)
        factor = float(broadcast_object(factor, self.ctx))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor
