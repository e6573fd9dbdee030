"""Torch inference: segmentor, then the binarized Bernoulli refiner for a few DDIM steps.

    pipe = HiDiffPipeline(segmentor, refiner, config=config, dataset_info=info, refiner_fp=twin)
    out = pipe.predict(x)                        # x: (N, C, H, W) normalised float32
    out.mask                                     # (N, H, W) uint8 label map
    pred = pipe.predict_image(image)             # image: HWC float in [0, 1], any size

The batch path (:meth:`HiDiffPipeline.predict`) is :func:`reference.predict_batch`, the one
predict loop every runtime shares; this class only supplies the two network callables:

1. ``segment``: ``prior, features = segmentor(x)`` once (``prior`` = sigmoid / softmax of its
   logits) and ``cache = refiner.precompute(x, prior, features)``, repeated for the S chains;
2. ``denoise``: ``sigmoid(refiner.forward_step(cache, y, s))`` for the chain states ``y``.

The loop draws ``reference.chain_uniforms(seed, prior.shape, n, S)``, runs S chains of the
reverse process (the model's offset and parameterisation, :mod:`reference.estimate`), averages
the chains' estimates (each chain's last y0_hat, or the mean of its steps' y0_hat: the config's
``sampling_estimate``) and takes the mask from that mean (``> 0.5`` for K = 1, argmax for K > 1);
``spread`` is the per-pixel standard deviation across chains.

The network runs in float32; the diffusion arithmetic (y0_hat, the step mean and every ``u < mean``
comparison) runs in float64 in :mod:`reference`, so the NumPy oracle and the edge runtime, fed the
same uniforms and the same network outputs, reproduce the samples bit for bit. The ``refiner``
argument picks ``"binary"`` (default), ``"fp"`` (the full-precision twin) or ``None`` / ``"none"``:
the segmentor alone, whose mask comes from the prior.

The uniforms are drawn for the whole batch ``(N, K, H, W)``: an image's result depends on its
position in the batch. :meth:`predict_image` (what evaluation and prediction use) always predicts
one image per call, so its result depends only on the image, the steps and the seed.

Whole images (:meth:`HiDiffPipeline.predict_image`) follow the dataset's preprocessing policy:

- ``resize``: the image is resized (bilinear) to ``config.image_size`` square, predicted as a batch
  of one, and the mask is resized back to the original size by nearest neighbour; ``prob`` and
  ``prior`` are resized back bilinearly (for display; the mask is not re-thresholded from them).
- ``tile``: the image is predicted at native resolution, cut by
  :func:`reference.images.extract_tiles` into ``info.tile`` x ``info.tile`` tiles overlapping by
  ``info.overlap`` pixels (zero-padded bottom/right when smaller than a tile). All tiles form one
  batch for the uniforms (``draw_uniforms(seed, (n_tiles, K, tile, tile), n)``, tiles in the
  row-major order of ``extract_tiles``); the network runs on ``tile_batch`` tiles at a time (the
  uniforms do not depend on it; float32 kernels may round differently per batch size). The
  probability maps (y0_hat, or the prior for the segmentor alone) are averaged where tiles overlap
  (:func:`reference.images.stitch_tiles`) and the mask is taken from the stitched
  probabilities. The normalised image is tiled (padding is therefore 0 in the
  normalised space).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

import reference
from hidiff.config import ModelConfig
from hidiff.data.info import DatasetInfo
from hidiff.scheduler import BernoulliScheduler, BernoulliSchedulerConfig
from hidiff.segmentor import prior_from_logits

__all__ = [
    "REFINER_CHOICES",
    "HiDiffPipeline",
    "ImagePrediction",
    "PipelineOutput",
    "make_scheduler",
]

#: accepted values of the ``refiner`` argument; ``None`` and ``"none"`` mean the segmentor alone
REFINER_CHOICES = ("binary", "fp", "none")


@dataclass(frozen=True)
class PipelineOutput:
    """Result of :meth:`HiDiffPipeline.predict` for a batch.

    ``mask``: (N, H, W) uint8 label map (0/1 for K = 1, class index for K > 1);
    ``prob``: (N, K, H, W) float64, the chains' mean estimate (the prior itself for the
    segmentor alone); ``prior``: (N, K, H, W) float32, the segmentor's prior p;
    ``spread``: (N, K, H, W) float64, the per-pixel standard deviation of the chains' estimates
    (the uncertainty map; 0 for one chain or the segmentor alone).
    """

    mask: Tensor
    prob: Tensor
    prior: Tensor
    spread: Tensor


#: one image's result at its own size (mask, prob, prior, spread)
ImagePrediction = reference.ImagePrediction


def make_scheduler(config: ModelConfig, steps: int | None = None) -> BernoulliScheduler:
    """The sampler of ``config`` respaced to ``steps`` (default ``config.diffusion`` 's
    ``num_sampling_steps``)."""
    d = config.diffusion
    scheduler = BernoulliScheduler(
        BernoulliSchedulerConfig(
            num_train_timesteps=d.num_steps,
            schedule=d.schedule,
            parameterization=config.refiner.parameterization,
            sampler=d.sampler,
            offset=config.refiner.offset,
        )
    )
    n = d.num_sampling_steps if steps is None else steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= d.num_steps:
        raise ValueError(f"steps must be an int in 1..{d.num_steps} (the model's T); got {n!r}")
    scheduler.set_timesteps(n)
    return scheduler


class HiDiffPipeline:
    """Segmentor + refiner(s) of one model, in eval mode, for inference (see module docstring).

    Args:
        segmentor: a segmentor module (``forward(x) -> SegmentorOutput(logits, features)``).
        refiner: the binary refiner (``precompute`` / ``forward_step``), or None.
        config: the :class:`ModelConfig` the networks were built from.
        dataset_info: preprocessing (policy, size / tile, normalisation) and labels.
        refiner_fp: the full-precision twin refiner, or None.
    """

    def __init__(
        self,
        segmentor: nn.Module,
        refiner: nn.Module | None,
        *,
        config: ModelConfig,
        dataset_info: DatasetInfo,
        refiner_fp: nn.Module | None = None,
    ) -> None:
        if dataset_info.channels != config.in_channels:
            raise ValueError(
                f"the dataset has {dataset_info.channels} image channels but the model expects "
                f"{config.in_channels}"
            )
        if dataset_info.num_classes != config.num_classes:
            raise ValueError(
                f"the dataset has K = {dataset_info.num_classes} mask channels but the model has "
                f"{config.num_classes}"
            )
        self.segmentor = segmentor.eval()
        self.refiners: dict[str, nn.Module | None] = {
            "binary": None if refiner is None else refiner.eval(),
            "fp": None if refiner_fp is None else refiner_fp.eval(),
        }
        self.config = config
        self.dataset_info = dataset_info

    # -- choices ------------------------------------------------------------------------------
    @property
    def has_fp(self) -> bool:
        return self.refiners["fp"] is not None

    def refiner_module(self, refiner: str | None) -> nn.Module | None:
        """The refiner for a ``refiner`` choice (None for the segmentor alone); ``ValueError``
        for an unknown choice or one this model lacks."""
        if refiner is None or refiner == "none":
            return None
        if refiner not in self.refiners:
            raise ValueError(
                f"refiner must be one of {', '.join(REFINER_CHOICES)} (or None); got {refiner!r}"
            )
        module = self.refiners[refiner]
        if module is None:
            what = "full-precision twin" if refiner == "fp" else "binary"
            raise ValueError(f"this model has no {what} refiner")
        return module

    @property
    def net_multiple(self) -> int:
        """Input sizes must be multiples of this (the deepest stride of the two networks)."""
        return max(2**self.config.segmentor.depth, self.config.refiner.strides[-1])

    # -- the batch path -----------------------------------------------------------------------
    def sampler(self, steps: int | None = None, samples: int | None = None, *,
                estimate: str | None = None) -> reference.Sampler:
        """The sampling of this model: ``steps`` evenly spread steps (default the config's),
        ``samples`` chains averaged (default the config's ``sampling_samples``) and each chain's
        ``estimate`` (default the config's ``sampling_estimate``; ``reference.ESTIMATES``)."""
        d = self.config.diffusion
        schedule = make_scheduler(self.config, steps).diffusion.schedule
        s = d.sampling_samples if samples is None else samples
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"samples must be an int >= 1; got {s!r}")
        return reference.Sampler(schedule, method=d.sampler,
                                 parameterization=self.config.refiner.parameterization,
                                 offset=self.config.refiner.offset, samples=s,
                                 estimate=d.sampling_estimate if estimate is None else estimate)

    def _segment(self, x: np.ndarray, module: nn.Module | None, samples: int):
        """``segment`` callable of :func:`reference.predict_batch`: the prior (float32 numpy)
        and, with a refiner, its time-independent cache repeated for the ``samples`` chains."""
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out = self.segmentor(xt)
        prior = prior_from_logits(out.logits)
        if module is None:
            return prior.numpy(), None
        cache = module.precompute(xt, prior, tuple(out.features))
        return prior.numpy(), (module, _repeat_batch(cache, samples))

    @staticmethod
    def _denoise(context, y: np.ndarray, step: int) -> np.ndarray:
        """``denoise`` callable: the network's probabilities for chain states ``y``."""
        module, cache = context
        t = torch.full((y.shape[0],), int(step), dtype=torch.long)
        yt = torch.from_numpy(y.astype(np.float32))
        return torch.sigmoid(module.forward_step(cache, yt, t)).numpy()

    def predict(
        self,
        images: Tensor,
        *,
        steps: int | None = None,
        samples: int | None = None,
        seed: int = 0,
        refiner: str | None = "binary",
        batch_size: int | None = None,
        estimate: str | None = None,
    ) -> PipelineOutput:
        """Predict a batch of normalised images ``(N, C, H, W)`` (H, W multiples of
        :attr:`net_multiple`) with :func:`reference.predict_batch`.

        ``refiner``: ``"binary"`` (default), ``"fp"`` (the full-precision twin) or ``None`` /
        ``"none"`` (segmentor alone; ``steps``, ``samples`` and ``seed`` are then unused).
        ``steps``: number of sampling steps (default: the config's), respaced evenly and always
        including T; ``samples``: chains averaged per image (default: the config's);
        ``estimate``: each chain's estimate, ``last`` or ``trajectory`` (default: the config's).
        ``batch_size`` runs the networks on that many images at a time: the uniforms are the same,
        but float32 kernels may round differently for another batch size, and a rounding change
        can flip a Bernoulli draw that the binary refiner then amplifies.
        """
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images must be (N, {self.config.in_channels}, H, W); got {tuple(images.shape)}"
            )
        m = self.net_multiple
        if images.shape[-1] % m or images.shape[-2] % m:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} must be a multiple of {m} for this model"
            )
        module = self.refiner_module(refiner)
        sampler = self.sampler(steps, samples, estimate=estimate) if module is not None else None
        s = 1 if sampler is None else sampler.samples
        with torch.no_grad():
            result = reference.predict_batch(
                images.float().numpy(),
                segment=lambda x: self._segment(x, module, s),
                denoise=self._denoise if module is not None else None,
                sampler=sampler,
                seed=seed,
                batch_size=batch_size,
            )
        prob = torch.from_numpy(result.prob)
        return PipelineOutput(torch.from_numpy(reference.final_labels(result.prob)), prob,
                              torch.from_numpy(result.prior), torch.from_numpy(result.spread))

    # -- whole images -------------------------------------------------------------------------
    def preprocessing(self) -> reference.Preprocessing:
        """The dataset's preprocessing facts, as :func:`reference.predict_image` takes them."""
        info, size = self.dataset_info, self.config.image_size
        if info.policy == "tile" and info.tile % self.net_multiple:
            raise ValueError(
                f"tile size {info.tile} of the dataset must be a multiple of {self.net_multiple}"
            )
        return reference.Preprocessing(
            policy=info.policy, mean=tuple(info.mean), std=tuple(info.std),
            input_size=(size, size) if info.policy == "resize" else None,
            tile=info.tile if info.policy == "tile" else 0,
            overlap=info.overlap if info.policy == "tile" else 0,
        )

    def predict_image(
        self,
        image: np.ndarray,
        *,
        steps: int | None = None,
        samples: int | None = None,
        seed: int = 0,
        refiner: str | None = "binary",
        tile_batch: int = reference.DEFAULT_TILE_BATCH,
        estimate: str | None = None,
    ) -> ImagePrediction:
        """Predict one HWC float image in [0, 1] at its original size with
        :func:`reference.predict_image` (see module docstring)."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"image must be HWC with {self.config.in_channels} channels; got shape "
                f"{image.shape}"
            )
        module = self.refiner_module(refiner)
        sampler = self.sampler(steps, samples, estimate=estimate) if module is not None else None
        s = 1 if sampler is None else sampler.samples
        with torch.no_grad():
            return reference.predict_image(
                image,
                preprocessing=self.preprocessing(),
                segment=lambda x: self._segment(x, module, s),
                denoise=self._denoise if module is not None else None,
                sampler=sampler,
                seed=seed,
                tile_batch=tile_batch,
            )


def _repeat_batch(obj, times: int):
    """Tensors (nested in tuples / named tuples) repeated ``times`` along the batch axis,
    chain-major (``cat([obj] * times)``), the layout of :func:`reference.reverse_process`."""
    if times == 1 or obj is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.repeat(times, *([1] * (obj.ndim - 1)))
    items = [_repeat_batch(o, times) for o in obj]
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
