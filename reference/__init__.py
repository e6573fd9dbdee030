"""NumPy reference of HiDiff: the oracle every other implementation is tested against.

Readable first, float64 inside, no dependency but numpy. One module per concept:

- :mod:`reference.schedule`   noise schedules and respacing (method §2)
- :mod:`reference.forward`    prior-guided Bernoulli forward process, flip map (§3)
- :mod:`reference.posterior`  q(y_{t-1} | y_t, y0, p) (§4)
- :mod:`reference.sampling`   parameterisations, DDIM-style / ancestral steps, the loop (§5)
- :mod:`reference.estimate`   the analytic estimate E[y0 | y_t, p] and the ``bayes`` offset
- :mod:`reference.inference`  the whole-batch predict loop (segment once, S chains averaged)
- :mod:`reference.whole_image` whole images: resize or tile, predict, back to the image's size
- :mod:`reference.images`     inference preprocessing: resize, normalise, tiles, stitching
- :mod:`reference.files`      image-file collection, mask PNGs (encoded without Pillow)
- :mod:`reference.overlay`    a prediction drawn over its image
- :mod:`reference.losses`     KL / NLL in bits, focal loss (§6)
- :mod:`reference.quantize`   sign with sign(0) = +1 (§7)
- :mod:`reference.bitpack`    LCE bit packing, popcount, the XNOR-popcount dot product (§7)
- :mod:`reference.binary_conv` binary convolution / linear by XNOR-popcount (§7)
- :mod:`reference.time_conditioning` time-dependent binarization (TB) and activation (TA) (§7)
- :mod:`reference.metrics`    Dice, IoU, HD95, recall, accuracy and aggregation (§10)
"""

from . import files, images, metrics, overlay
from .binary_conv import ALLOWED_PAD_VALUES, binary_conv2d, binary_linear, conv_output_size
from .bitpack import WORD_BITS, bitpack, bitunpack, num_words, popcount, xnor_popcount_dot
from .estimate import OFFSETS, add_logits, bayes_estimate, check_offset, refiner_output
from .forward import (
    bernoulli_sample,
    flip_probability,
    q_mean,
    q_sample,
    q_sample_flip,
    q_step_mean,
)
from .inference import (
    DEFAULT_TILE_BATCH,
    BatchPrediction,
    Sampler,
    predict_batch,
    uncertainty_pixels,
)
from .losses import (
    PROB_EPS,
    bernoulli_kl,
    focal_loss,
    kl_bits,
    nll_bits,
    refiner_loss,
    refiner_loss_terms,
)
from .posterior import q_posterior_mean
from .quantize import sign
from .sampling import (
    ESTIMATES,
    PARAMETERIZATIONS,
    SAMPLERS,
    ReverseResult,
    chain_uniforms,
    check_estimate,
    ddim_mean,
    draw_uniforms,
    final_labels,
    final_mask,
    reverse_process,
    step_mean,
    y0_from_eps,
    y0_from_output,
)
from .schedule import SCHEDULE_NAMES, Schedule, make_schedule, respace, spaced_steps
from .time_conditioning import time_activation, time_binarization
from .whole_image import POLICIES, ImagePrediction, Preprocessing, network_inputs, predict_image

__all__ = [
    "POLICIES",
    "ImagePrediction",
    "Preprocessing",
    "files",
    "images",
    "overlay",
    "network_inputs",
    "predict_image",
    "OFFSETS",
    "DEFAULT_TILE_BATCH",
    "BatchPrediction",
    "Sampler",
    "add_logits",
    "bayes_estimate",
    "check_offset",
    "chain_uniforms",
    "check_estimate",
    "predict_batch",
    "uncertainty_pixels",
    "refiner_output",
    "ALLOWED_PAD_VALUES",
    "WORD_BITS",
    "binary_conv2d",
    "binary_linear",
    "bitpack",
    "bitunpack",
    "conv_output_size",
    "metrics",
    "num_words",
    "popcount",
    "sign",
    "time_activation",
    "time_binarization",
    "xnor_popcount_dot",
    "ESTIMATES",
    "PARAMETERIZATIONS",
    "PROB_EPS",
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "ReverseResult",
    "Schedule",
    "bernoulli_kl",
    "bernoulli_sample",
    "ddim_mean",
    "draw_uniforms",
    "final_labels",
    "final_mask",
    "flip_probability",
    "focal_loss",
    "kl_bits",
    "make_schedule",
    "nll_bits",
    "q_mean",
    "q_posterior_mean",
    "q_sample",
    "q_sample_flip",
    "q_step_mean",
    "refiner_loss",
    "refiner_loss_terms",
    "respace",
    "reverse_process",
    "spaced_steps",
    "step_mean",
    "y0_from_eps",
    "y0_from_output",
]
