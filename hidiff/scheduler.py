"""A diffusers-shaped sampler for the Bernoulli reverse process (method §5).

    scheduler = BernoulliScheduler(BernoulliSchedulerConfig(num_train_timesteps=10))
    scheduler.set_timesteps(5)                   # respaced: 5 evenly spread steps ending at T
    y = scheduler.initial_sample(prior, u[0])    # y_T ~ B(prior)
    for k, step in enumerate(scheduler.timesteps):
        out = torch.sigmoid(refiner(x, y, prior, features, step))
        res = scheduler.step(out, step, y, prior=prior, u=u[k + 1] if k + 1 < len(u) else None)
        y = res.prev_sample
    mask = res.pred_original_sample > 0.5        # the "last" estimate of one chain

The configuration is frozen. ``timesteps`` are *original* step indices in decreasing order (what the
network is told). Randomness is explicit: each step takes the uniforms ``u`` of its draw, e.g. from
:func:`reference.draw_uniforms` so the NumPy oracle and the edge runtime see the same draws. At the
last step no draw is made and ``prev_sample`` is the probability map ``y0_hat``. How a chain's
estimate is formed from its steps (the config's ``sampling_estimate``) is the loop's business
(:func:`reference.reverse_process`, what ``HiDiffPipeline`` runs), not the scheduler's.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import torch

import reference
from reference.sampling import PARAMETERIZATIONS, SAMPLERS

from .diffusion import BernoulliDiffusion, _check_choice


@dataclass(frozen=True)
class BernoulliSchedulerConfig:
    """Frozen configuration: the training schedule, parameterisation and sampler."""

    num_train_timesteps: int = 10
    schedule: str = "cosine"
    parameterization: str = "eps"
    sampler: str = "ddim"
    offset: str = "none"

    def __post_init__(self) -> None:
        _check_choice(self.schedule, reference.SCHEDULE_NAMES, "schedule")
        _check_choice(self.parameterization, PARAMETERIZATIONS, "parameterization")
        _check_choice(self.sampler, SAMPLERS, "sampler")
        reference.check_offset(self.offset)
        if int(self.num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BernoulliSchedulerOutput:
    """Result of one :meth:`BernoulliScheduler.step`.

    ``prev_sample``: y_{t_prev} (0/1) or, at the last step, the probability map y0_hat;
    ``pred_original_sample``: y0_hat; ``prev_mean``: the Bernoulli mean that was sampled
    (None at the last step).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    prev_mean: torch.Tensor | None


class BernoulliScheduler:
    """Reverse-process sampler over a (possibly respaced) Bernoulli schedule."""

    def __init__(self, config: BernoulliSchedulerConfig) -> None:
        self.config = config
        self.train_diffusion = BernoulliDiffusion.from_name(
            config.schedule, config.num_train_timesteps
        )
        self.set_timesteps(None)

    def set_timesteps(self, num_inference_steps: int | list[int] | None = None) -> None:
        """Choose the sampling steps: ``None`` = all T, an int = that many evenly spread steps
        (always including T), or an explicit increasing list of original steps containing T."""
        t_max = self.config.num_train_timesteps
        if num_inference_steps is None:
            steps = list(range(1, t_max + 1))
        elif isinstance(num_inference_steps, numbers.Integral) and not isinstance(
                num_inference_steps, bool):
            steps = reference.spaced_steps(t_max, int(num_inference_steps))
        else:
            steps = [int(s) for s in num_inference_steps]
        self.diffusion = BernoulliDiffusion(reference.respace(self.train_diffusion.schedule, steps))
        # original indices, decreasing, like diffusers' `timesteps`
        self.timesteps = torch.tensor(steps[::-1], dtype=torch.long)
        self._index_of = {s: j + 1 for j, s in enumerate(steps)}

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_draws(self) -> int:
        """How many uniform arrays a full sampling run consumes (y_T plus one per step but the
        last): ``reference.draw_uniforms(seed, shape, scheduler.num_draws)``."""
        return self.num_inference_steps

    @staticmethod
    def initial_sample(prior: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """y_T ~ B(prior) as ``u < prior``."""
        return (u.to(prior.dtype) < prior).to(prior.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        *,
        prior: torch.Tensor,
        u: torch.Tensor | None,
    ) -> BernoulliSchedulerOutput:
        """One reverse step from original step ``timestep``; ``model_output`` is the network's
        probability (the config's ``offset`` turns it into the refiner's output)."""
        step = int(timestep)
        if step not in self._index_of:
            raise ValueError(
                f"timestep {step} is not among the scheduled {self.timesteps.tolist()}"
            )
        j = self._index_of[step]
        cfg = self.config
        output = self.diffusion.offset_output(
            model_output, y_t=sample, prior=prior,
            t=torch.full((sample.shape[0],), j, dtype=torch.long),
            parameterization=cfg.parameterization, offset=cfg.offset)
        y0_hat = self.diffusion.y0_from_output(sample, output, cfg.parameterization)
        if j == 1:
            return BernoulliSchedulerOutput(y0_hat, y0_hat, None)
        if u is None:
            raise ValueError(f"step {step} samples y_prev and needs uniforms u")
        t = torch.full((sample.shape[0],), j, dtype=torch.long)
        if self.config.sampler == "ddim":
            mean = self.diffusion.ddim_mean(sample, y0_hat, t, t - 1)
        else:
            mean = self.diffusion.q_posterior_mean(sample, y0_hat, prior, t)
        prev = (u.to(mean.dtype) < mean).to(mean.dtype)
        return BernoulliSchedulerOutput(prev, y0_hat, mean)
