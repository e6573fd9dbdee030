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

from __future__ import annotations

import importlib

# Public name -> defining module. Imported lazily (PEP 562) so that torch-free parts such as
# ``hidiff.data`` can be imported without torch.
_EXPORTS = {
    "ModelConfig": "config",
    "list_presets": "config",
    "preset": "config",
    "BernoulliDiffusion": "diffusion",
    "BinaryConv2d": "layers",
    "BinaryLinear": "layers",
    "TimeActivation": "layers",
    "TimeBinarization": "layers",
    "HiDiffPipeline": "pipeline",
    "approx_sign": "quantizers",
    "ste_sign": "quantizers",
    "BinaryRefiner": "refiner",
    "BernoulliScheduler": "scheduler",
    "BernoulliSchedulerConfig": "scheduler",
    "Segmentor": "segmentor",
    "UNetSegmentor": "segmentor",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hidiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
