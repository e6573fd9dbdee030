"""``train(...)``: alternate-collaborative training of a segmentor and the binary refiner.

See :func:`train`. The pieces: :mod:`.setup` (arguments, data, split), :mod:`.phases` (which
phase an iteration is in, the segmentor's rate), :mod:`.steps` (one iteration, method §6),
:mod:`.batches` (data order), :mod:`.checkpoint` / :mod:`.model_dir` (the model folder),
:mod:`.train_log` / :mod:`.plot` (logs), :mod:`.distributed` (torchrun).
"""

from __future__ import annotations

import math
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hidiff.checkpoint import capture_global_rng, save_checkpoint
from hidiff.model_dir import (
    CHECKPOINT,
    CURVE_PNG,
    HEADER_FILES,
    TRAIN_LOG,
    remove_stale_temp_files,
    write_model_files,
)
from hidiff.training.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    gather_objects,
    parameter_digest,
    setup_distributed,
    teardown_distributed,
    unwrap,
)
from hidiff.training.phases import PhaseTracker
from hidiff.training.plot import plot_training_curve
from hidiff.training.run_state import RunState, build_state, run_synchronised
from hidiff.training.setup import RunSpec, TrainArgs, prepare_run
from hidiff.training.signals import StopSignals, TrainingDiverged, TrainingInterrupted
from hidiff.training.steps import train_step
from hidiff.training.train_log import TrainLog
from hidiff.training.validation import segmentor_dice

__all__ = ["TrainResult", "train"]

LOSS_KEYS = ("loss_refiner", "loss_refiner_fp", "loss_seg", "loss_seg_diff", "loss_segmentor")


@dataclass(frozen=True)
class TrainResult:
    """What a :func:`train` call did.

    ``step``: completed iterations (all sessions); ``start_step``: where this call began (> 0
    after a resume); ``stopped_by``: ``"max_steps"`` or ``"max_minutes"`` (a signal raises
    :class:`~hidiff.training.signals.TrainingInterrupted` instead); ``elapsed_s``: this
    call's training seconds; ``last_losses``: the losses of the last iteration; ``val_dice``: the
    last validation Dice of the segmentor alone (None without ``val_every``).
    """

    out: Path
    step: int
    start_step: int
    stopped_by: str
    elapsed_s: float
    last_losses: dict[str, float] = field(default_factory=dict)
    val_dice: float | None = None

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def log(self) -> Path:
        return self.out / TRAIN_LOG


def train(*, dataset: str, data: str | Path, preset: str, out: str | Path,
          max_steps: int | None = None, max_minutes: float | None = None,
          batch_size: int | None = None, lr: float = 1e-4, seed: int = 0,
          pretrain_steps: int = 0, pretrain_minutes: float = 0.0,
          train_fp_twin: bool = False, lambda_diff: float = 1.0,
          resume: bool = False, log_every: int = 10, checkpoint_every: int = 100,
          val_every: int | None = None, num_workers: int = 0, progress: bool = True,
          limit_cases: int | None = None, weight_decay: float = 0.01,
          grad_clip: float | None = 1.0, device: str | None = None, offset: str = "bayes",
          self_align: float = 0.5, refiner_holdout: float = 0.0,
          lambda_y0: float = 1.0, y0_term: str = "both",
          segmentor_schedule: str = "cosine",
          refine_after_steps: int | None = None,
          refine_after_minutes: float | None = None) -> TrainResult:
    """Train a HiDiff model (segmentor + binary refiner, method §6) into the folder ``out``.

    Args:
        dataset: reader name (``kvasir-seg``, ``chase-db1``, ``drive``, ``cvc-clinicdb``,
            ``generic``); ``data``: the dataset folder. The committed split's ``train`` subset
            is trained on (``hidiff.data.default_split``).
        preset: model preset (``paper``, ``cpu-base``, ``cpu-small``, ``tiny``).
        out: the model folder; must be new or empty unless ``resume``.
        max_steps: total iterations; ``max_minutes``: total training time of the run; both
            count what came before a resume, so an interrupted run resumed with the same
            values stops where it would have (raise them to go on). Training stops at whichever
            comes first; give at least one. Training time is the wall clock of the training
            loop (start-up, data indexing and model building left out).
        batch_size: per process (default by preset: paper 32, others 8).
        lr, weight_decay, grad_clip: AdamW and gradient-norm clipping (None: no clipping), the
            same for every network.
        seed: seeds model init, data order, augmentation and the diffusion draws (per rank).
        pretrain_steps: the first iterations train the segmentor on L_seg alone.
        pretrain_minutes: also train the segmentor alone until the run's training time
            (resumed time included) reaches this; then the alternating phase (so a wall-clock
            budget can be split: ``max_minutes=20, pretrain_minutes=12``).
        train_fp_twin: also train the full-precision twin refiner in the refiner phase (an
            ablation for comparing binary with full precision; off by default).
        lambda_diff: weight of L_diff in the segmentor phase (0 = no collaboration).
        resume: continue ``out`` from its checkpoint (optimizer, RNG states and data position
            included, so the continuation equals an uninterrupted run). The stored trajectory
            arguments (batch size, lr, seed, ...) win over the ones given (with a warning). A
            folder whose run was killed before its first checkpoint starts again from step 0.
        log_every / checkpoint_every: iterations between log records / checkpoints (a
            checkpoint is also written when the run ends, and on SIGINT / SIGTERM, which stop
            it after the running iteration and raise
            :class:`~hidiff.training.signals.TrainingInterrupted`, a ``KeyboardInterrupt``).
        val_every: iterations between validation Dice measurements of the segmentor alone on
            the val split (its first ``limit_cases`` cases when that is set); None: never.
        num_workers: DataLoader worker processes. progress: show a tqdm bar (rank 0).
        limit_cases: train on the first N train-split cases only (tests, demos).
        device: ``"cpu"``, ``"cuda"``...; None: CUDA when available.
        offset: the refiner's output form (``"bayes"``: logits added to the analytic estimate,
            an untrained refiner reproduces the segmentor; ``"none"``: the plain form), stored in
            the model's config.
        self_align: fraction of each refiner batch whose y_t is built from the refiner's own
            estimate (:func:`hidiff.training.steps.self_aligned_sample`); 0 = off. Default 0.5
            (chosen on the val split: without it more sampling steps destroy the mask).
        refiner_holdout: fraction of the train cases the segmentor never trains on; the
            refiner phase trains on them alone (their priors are as wrong as the segmentor's on
            new images, where on its own training cases they are nearly right). Recorded as the
            ``train_refiner`` subset of the folder's ``split.json``. 0 (default): one set.
        lambda_y0: weight of the cross-entropy of the refiner's y0 estimate (what sampling
            averages and thresholds) added to the diffusion loss L_diff at every t (the
            refiner's loss and, through ``lambda_diff``, the segmentor's); 0 = off. Default 1
            (chosen on the val split, ``benchmarks/results/ablation_levers.md``).
        y0_term: ``"both"`` (default): that term is part of L_diff in both phases;
            ``"refiner"``: only the refiner's loss has it, the segmentor phase's L_diff is the
            plain diffusion loss (an ablation, ``ablation_levers.md``).
        segmentor_schedule: ``"cosine"`` (default): the segmentor's learning rate annealed to 0
            where its training ends (the refiner-alone phase or the run's stop, in steps or
            minutes, whichever is first; :mod:`hidiff.training.lr_schedule`), chosen on the val
            split; ``"constant"``: ``lr`` throughout. The end is part of the schedule, so a run
            stopped at ``max_steps`` and resumed with a later one anneals differently from one
            run straight to it (an interrupted run resumed with the same ends does not).
        refine_after_steps / refine_after_minutes: the last phase trains the refiner alone,
            the segmentor frozen (no segmentor step, so an iteration costs about half of an
            alternating one), from the first iteration where ``step`` reaches
            ``refine_after_steps`` or the run's training time (resumed time included) reaches
            ``refine_after_minutes``, whichever comes first, until the run stops. None (default):
            never. A fresh run needs them > 0 and at or after the end of pre-training. On
            resume a given value replaces the stored one, with a warning (None keeps it), so a
            finished run can go on with its segmentor frozen: ``resume=True, max_minutes=55,
            refine_after_minutes=0`` after a 30-minute run.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process runs this; training cases are sharded
    by rank and only rank 0 writes. Bad input raises ``ValueError`` (``DataError`` for data
    problems, ``ModelDirError`` for the folder) before anything is written; a run failing with an
    error before its first checkpoint removes what it wrote (the folder too, if it created it).
    """
    args = TrainArgs(dataset=dataset, data=str(data), preset=preset, out=str(out),
                     max_steps=max_steps, max_minutes=max_minutes, batch_size=batch_size,
                     lr=lr, seed=seed, pretrain_steps=pretrain_steps,
                     pretrain_minutes=pretrain_minutes,
                     train_fp_twin=train_fp_twin, lambda_diff=lambda_diff, resume=resume,
                     log_every=log_every, checkpoint_every=checkpoint_every,
                     val_every=val_every, num_workers=num_workers, progress=progress,
                     limit_cases=limit_cases, weight_decay=weight_decay, grad_clip=grad_clip,
                     device=device, offset=offset, self_align=self_align,
                     refiner_holdout=refiner_holdout, lambda_y0=lambda_y0, y0_term=y0_term,
                     segmentor_schedule=segmentor_schedule,
                     refine_after_steps=refine_after_steps,
                     refine_after_minutes=refine_after_minutes)
    args.check()
    ctx = setup_distributed(device)
    try:
        spec = run_synchronised(lambda: prepare_run(args), ctx)
        session = _Session(spec, ctx)
        result = session.run()
        # every rank done (rank 0 writes last) before any tears the process group down: a
        # gloo group destroyed while its peer is still connected can abort the process
        barrier(ctx)
        if result.stopped_by == "signal":  # the checkpoint of the last step is written
            raise TrainingInterrupted(session.signals.received or signal.SIGTERM, result.step,
                                      result.out)
        return result
    finally:
        teardown_distributed(ctx)


class _Session:
    """One call of :func:`train` on one rank."""

    def __init__(self, spec: RunSpec, ctx: DistContext) -> None:
        self.spec, self.ctx, self.args = spec, ctx, spec.args
        self.out = spec.out
        self.created_folder = False
        self.saved_step: int | None = None  # step of the last checkpoint this call wrote
        self.state: RunState = build_state(spec, ctx)
        self.log = TrainLog(None)
        self.val_dice: float | None = None
        self.last_epoch = 0
        self.last_phase = "pretrain"
        self.phases = PhaseTracker(spec.args, ctx)
        self.bar = None

    # -- files ----------------------------------------------------------------------------------
    def _start_files(self) -> None:
        if not self.ctx.is_main:
            return
        if self.args.resume:
            remove_stale_temp_files(self.out)
            self.log = TrainLog.resume(self.out / TRAIN_LOG, self.state.step)
            self.val_dice = self.log.last("val_dice")
            return
        self.created_folder = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        write_model_files(self.out, config=self.spec.config, dataset_info=self.spec.info,
                          split=self.spec.split,
                          extra={"preset": self.args.preset, "dataset": self.args.dataset})
        self.log = TrainLog(self.out / TRAIN_LOG)

    def _discard_files(self) -> None:
        """After a failure before the first checkpoint of a fresh run: remove what we wrote."""
        if not self.ctx.is_main or self.args.resume or self.saved_step is not None:
            return
        if self.created_folder:
            shutil.rmtree(self.out, ignore_errors=True)
        elif self.out.is_dir():
            for name in (*HEADER_FILES, TRAIN_LOG, CURVE_PNG, CHECKPOINT):
                (self.out / name).unlink(missing_ok=True)

    def _checkpoint(self) -> None:
        st = self.state
        per_rank = gather_objects({**capture_global_rng(), "diffusion": st.draws.get_state()},
                                  self.ctx)
        digests = None
        if self.ctx.enabled:
            digest = parameter_digest(st.nets.segmentor, st.nets.refiner, st.nets.refiner_fp)
            digests = gather_objects(digest, self.ctx)
        if not self.ctx.is_main:
            self.saved_step = st.step  # every rank must agree on whether a final one is due
            return
        nets, opts = st.nets, st.opts
        save_checkpoint(self.out / CHECKPOINT, {
            "step": st.step,
            "refiner_steps": st.refiner_steps,
            "segmentor": unwrap(nets.segmentor).state_dict(),
            "refiner": unwrap(nets.refiner).state_dict(),
            "refiner_fp": None if nets.refiner_fp is None
            else unwrap(nets.refiner_fp).state_dict(),
            "optimizers": {
                "segmentor": opts.segmentor.state_dict(),
                "refiner": opts.refiner.state_dict(),
                "refiner_fp": None if opts.refiner_fp is None else opts.refiner_fp.state_dict(),
            },
            "rng": per_rank,
            "world_size": self.ctx.world_size,
            "train_args": self.args.to_dict(),
            "elapsed_s": st.elapsed_before + (time.monotonic() - self.t0),
        })
        self.saved_step = st.step
        if digests is not None and self.log.records and self.log.records[-1]["step"] == st.step:
            self.log.update_last(param_sha256_by_rank=digests)
        elif digests is not None:
            self.log.append({"step": st.step, "param_sha256_by_rank": digests})
        self._plot()

    def _plot(self) -> None:
        if self.ctx.is_main:
            title = f"{self.args.dataset}, preset {self.args.preset}"
            plot_training_curve(self.log.records, self.out / CURVE_PNG, title=title)

    # -- loop -----------------------------------------------------------------------------------
    def _validate(self) -> float | None:
        if self.spec.val_set is None or not self.ctx.is_main:
            return None
        self.val_dice = segmentor_dice(unwrap(self.state.nets.segmentor), self.spec.val_set)
        return self.val_dice

    def _record(self, epoch: int, logs: dict[str, float], val: float | None) -> dict[str, Any]:
        st = self.state
        phase = self.last_phase
        record: dict[str, Any] = {"step": st.step, "phase": phase, "epoch": epoch, **logs,
                                  "lr": st.opts.segmentor.param_groups[0]["lr"],
                                  "elapsed_s": round(st.elapsed_before
                                                     + time.monotonic() - self.t0, 3)}
        if val is not None:
            record["val_dice"] = val
            record["val_cases"] = len(self.spec.val_set)
        return record

    def _elapsed(self) -> float:
        return self.state.elapsed_before + time.monotonic() - self.t0

    def _stop_reason(self) -> str | None:
        """``"signal"`` after SIGINT / SIGTERM, ``"max_minutes"`` when the time is up, else None
        (rank 0 decides for every rank)."""
        limit = self.args.max_minutes
        reason = None
        if self.signals.received is not None:
            reason = "signal"
        elif limit is not None and self._elapsed() >= 60.0 * limit:
            reason = "max_minutes"
        return broadcast_object(reason, self.ctx)

    def run(self) -> TrainResult:
        args, st = self.args, self.state
        self.t0 = time.monotonic()
        start = self.start_step = st.step
        self.signals = StopSignals()
        try:
            self.signals.__enter__()
            run_synchronised(self._start_files, self.ctx)
            if start == 0 and args.val_every is not None and self.ctx.is_main:
                self.log.append({"step": 0, "val_dice": self._validate(),
                                 "val_cases": len(self.spec.val_set)})
            stopped_by, logs = self._loop()
            if st.step == start > 0 and stopped_by != "signal" and self.ctx.is_main:
                warnings.warn(f"{self.out}: nothing to train, the run had already reached its "
                              f"{stopped_by} (step {start}, {self._elapsed() / 60:.2f} min of "
                              "training): raise it to go on", stacklevel=3)
            if self.ctx.is_main and st.step > start and self.log.last("step") != st.step:
                val = self._validate() if args.val_every is not None else None
                self.log.append(self._record(self.last_epoch, logs, val))
            if self.saved_step != st.step:
                self._checkpoint()
            else:
                self._plot()
        except BaseException:
            self._discard_files()
            raise
        finally:
            self.signals.__exit__()
            if self.bar is not None:
                self.bar.close()
        return TrainResult(self.out, st.step, start, stopped_by, time.monotonic() - self.t0,
                           {k: logs[k] for k in LOSS_KEYS if k in logs}, self.val_dice)

    def _loop(self) -> tuple[str, dict[str, float]]:
        from tqdm.auto import tqdm

        args, st, ctx = self.args, self.state, self.ctx
        self.bar = tqdm(total=args.max_steps, initial=st.step, desc="train", unit="it",
                        disable=not (args.progress and ctx.is_main), dynamic_ncols=True)
        logs: dict[str, float] = {}
        while True:
            if args.max_steps is not None and st.step >= args.max_steps:
                return "max_steps", logs
            stop = self._stop_reason()
            if stop is not None:
                return stop, logs
            epoch, batch = next(st.batches)
            self.last_epoch = epoch
            x = batch["image"].to(ctx.device, non_blocking=True)
            y0 = batch["mask"].to(ctx.device, non_blocking=True)
            phase = self.phases.phase(st.step, self._elapsed())
            if phase != "refine" and args.segmentor_schedule != "constant":
                self.phases.set_segmentor_lr(st.opts.segmentor, step=st.step,
                                             elapsed_s=self._elapsed())
            refiner_batch = None
            if phase != "pretrain" and st.refiner_batches is not None:
                _, rb = next(st.refiner_batches)
                refiner_batch = (rb["image"].to(ctx.device, non_blocking=True),
                                 rb["mask"].to(ctx.device, non_blocking=True))
            logs = train_step(st.nets, st.opts, st.diffusion, st.draws, x, y0, st.settings,
                              pretrain=phase == "pretrain", refine_only=phase == "refine",
                              refiner_batch=refiner_batch)
            if phase != "pretrain":
                st.refiner_steps += 1
            self.last_phase = phase
            st.step += 1
            if not all(math.isfinite(v) for v in logs.values()):
                kept = self.saved_step if self.saved_step is not None else (
                    self.start_step if self.start_step > 0 else None)
                raise TrainingDiverged(st.step, logs, args.lr, self.out, kept)
            self.bar.update(1)
            self.bar.set_postfix({k.removeprefix("loss_"): f"{logs[k]:.4f}"
                                  for k in ("loss_segmentor", "loss_refiner", "loss_refiner_fp")
                                  if k in logs}, refresh=False)
            last = args.max_steps is not None and st.step >= args.max_steps
            val = None
            if args.val_every is not None and (st.step % args.val_every == 0 or last):
                val = self._validate()
            if ctx.is_main and (st.step % args.log_every == 0 or st.step == 1 or last
                                or val is not None):
                self.log.append(self._record(epoch, logs, val))
            if st.step % args.checkpoint_every == 0:
                self._checkpoint()

