"""hidiff: HiDiff in PyTorch — segmentor, binarized Bernoulli diffusion refiner, training.

The public surface (everything else is reachable through its module):

- configuration: :class:`ModelConfig`, :func:`preset`, :func:`list_presets`
- binary layers (larq-shaped): :func:`ste_sign`, :func:`approx_sign`, :class:`BinaryConv2d`,
  :class:`BinaryLinear`, :class:`TimeBinarization`, :class:`TimeActivation`
- networks: :class:`Segmentor` (protocol), :class:`UNetSegmentor`, :class:`BinaryRefiner`
- diffusion: :class:`BernoulliDiffusion`, :class:`BernoulliScheduler`,
  :class:`BernoulliSchedulerConfig`
- inference: :class:`HiDiffPipeline`
"""

from .config import ModelConfig, list_presets, preset
from .diffusion import BernoulliDiffusion
from .layers import BinaryConv2d, BinaryLinear, TimeActivation, TimeBinarization
from .pipeline import HiDiffPipeline
from .quantizers import approx_sign, ste_sign
from .refiner import BinaryRefiner
from .scheduler import BernoulliScheduler, BernoulliSchedulerConfig
from .segmentor import Segmentor, UNetSegmentor

__version__ = "0.1.0"

__all__ = [
    "BernoulliDiffusion",
    "BernoulliScheduler",
    "BernoulliSchedulerConfig",
    "BinaryConv2d",
    "BinaryLinear",
    "BinaryRefiner",
    "HiDiffPipeline",
    "ModelConfig",
    "Segmentor",
    "TimeActivation",
    "TimeBinarization",
    "UNetSegmentor",
    "approx_sign",
    "list_presets",
    "preset",
    "ste_sign",
]
