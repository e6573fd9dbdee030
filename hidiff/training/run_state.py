"""The mutable state of a run: networks, optimizers, RNGs, data iterator; built or resumed.

Seeding: the networks are initialised under ``torch.manual_seed(seed)`` on every rank (so they
start identical); then the global torch/numpy/python generators get a per-rank seed and the
diffusion draws their own per-rank generator (:func:`hidiff.training.distributed.derive_seed`).
A resumed run restores every one of these states from the checkpoint, after building.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from hidiff.checkpoint import restore_global_rng
from hidiff.diffusion import BernoulliDiffusion
from hidiff.model_dir import CHECKPOINT, ModelDirError, build_networks
from hidiff.training.batches import BatchPlan, iterate_batches
from hidiff.training.distributed import DistContext, derive_seed, gather_objects, wrap
from hidiff.training.setup import RunSpec
from hidiff.training.steps import DiffusionDraws, Networks, Optimizers, StepSettings

__all__ = ["RunState", "build_state", "run_synchronised"]

T = TypeVar("T")
_GLOBAL_RNG_KEY, _DIFFUSION_RNG_KEY = 1, 2


@dataclass
class RunState:
    nets: Networks
    opts: Optimizers
    diffusion: BernoulliDiffusion
    draws: DiffusionDraws
    settings: StepSettings
    batches: Iterator[tuple[int, dict[str, Any]]]
    step: int = 0
    elapsed_before: float = 0.0
    #: the refiner phase's own batches (``refiner_holdout``) and how many it has taken
    refiner_batches: Iterator[tuple[int, dict[str, Any]]] | None = None
    refiner_steps: int = 0


def run_synchronised(fn: Callable[[], T], ctx: DistContext) -> T:
    """``fn()`` on every rank; if it fails on any rank, every rank raises (no rank hangs)."""
    if not ctx.enabled:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # re-raised below, after the other ranks know
        error = err
    messages = gather_objects(None if error is None else f"{type(error).__name__}: {error}", ctx)
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, msg in enumerate(messages) if msg]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return result  # type: ignore[return-value]


def _adamw(module: torch.nn.Module, spec: RunSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW(module.parameters(), lr=spec.args.lr,
                             weight_decay=spec.args.weight_decay)


def build_state(spec: RunSpec, ctx: DistContext) -> RunState:
    """Networks, optimizers and generators of ``spec``, restored from its checkpoint if any."""
    if spec.refiner_set is not None and len(spec.refiner_set) < ctx.world_size:
        raise ValueError(f"refiner_holdout={spec.args.refiner_holdout} leaves "
                         f"{len(spec.refiner_set)} case(s) for the refiner, fewer than the "
                         f"{ctx.world_size} processes that share them; hold out more")
    args, cfg, ckpt = spec.args, spec.config, spec.checkpoint
    if cfg.diffusion.focal_gamma != 2.0:
        raise ValueError("hidiff.diffusion.diffusion_loss uses focal gamma 2; config.json asks "
                         f"for {cfg.diffusion.focal_gamma}")
    torch.manual_seed(args.seed)
    seg, ref, ref_fp = build_networks(cfg, fp_twin=args.train_fp_twin)
    path = spec.out / CHECKPOINT
    if ckpt is not None:
        if (ckpt.get("refiner_fp") is None) != (ref_fp is None):
            raise ModelDirError(path, "was written with a different train_fp_twin setting")
        stored_world = int(ckpt.get("world_size", 1))
        if stored_world != ctx.world_size:
            raise ModelDirError(path, f"was written by {stored_world} process(es); resume it "
                                      f"with the same number (got {ctx.world_size})")
        for net, key in ((seg, "segmentor"), (ref, "refiner"), (ref_fp, "refiner_fp")):
            if net is not None:
                net.load_state_dict(ckpt[key])
    nets = Networks(wrap(seg, ctx), wrap(ref, ctx), None if ref_fp is None else wrap(ref_fp, ctx))
    opts = Optimizers(_adamw(seg, spec), _adamw(ref, spec),
                      None if ref_fp is None else _adamw(ref_fp, spec))
    draws = DiffusionDraws(cfg.diffusion.num_steps,
                           derive_seed(args.seed, ctx.rank, _DIFFUSION_RNG_KEY))
    rank_seed = derive_seed(args.seed, ctx.rank, _GLOBAL_RNG_KEY)
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)
    step, elapsed, refiner_steps = 0, 0.0, 0
    if ckpt is not None:
        states = ckpt["optimizers"]
        opts.segmentor.load_state_dict(states["segmentor"])
        opts.refiner.load_state_dict(states["refiner"])
        if opts.refiner_fp is not None:
            opts.refiner_fp.load_state_dict(states["refiner_fp"])
        rng = ckpt["rng"][ctx.rank]
        restore_global_rng(rng)
        draws.set_state(rng["diffusion"])
        step, elapsed = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
        refiner_steps = int(ckpt.get("refiner_steps", 0))
    plan = BatchPlan(len(spec.train_set), args.batch_size, args.seed, ctx.rank, ctx.world_size)
    settings = StepSettings(lambda_diff=float(args.lambda_diff),
                            lambda_focal=cfg.diffusion.lambda_focal,
                            parameterization=cfg.refiner.parameterization,
                            offset=cfg.refiner.offset,
                            self_align=float(args.self_align),
                            lambda_y0=float(args.lambda_y0),
                            y0_in_segmentor=args.y0_term == "both",
                            grad_clip=args.grad_clip)
    diffusion = BernoulliDiffusion.from_name(cfg.diffusion.schedule, cfg.diffusion.num_steps)
    batches = iterate_batches(spec.train_set, plan, step, num_workers=args.num_workers)
    refiner_batches = None
    if spec.refiner_set is not None:
        ref_plan = BatchPlan(len(spec.refiner_set), args.batch_size, args.seed, ctx.rank,
                             ctx.world_size)
        refiner_batches = iterate_batches(spec.refiner_set, ref_plan, refiner_steps,
                                          num_workers=args.num_workers)
    return RunState(nets, opts, diffusion, draws, settings, batches, step, elapsed,
                    refiner_batches, refiner_steps)
