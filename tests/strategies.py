"""Hypothesis strategies shared by the reference tests: probabilities with exact 0/1 edges."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference import make_schedule

EDGE_PROBS = [0.0, 1.0, 0.5, 1e-12, 1 - 1e-12, 1e-300]


def probs(shape=(6,)):
    """Float64 arrays in [0, 1] where exact 0, exact 1 and near-saturated values are common."""
    elems = st.one_of(st.sampled_from(EDGE_PROBS), st.floats(0.0, 1.0, allow_subnormal=False))
    return hnp.arrays(np.float64, shape, elements=elems)


def bits(shape=(6,)):
    return hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0]))


@st.composite
def schedules(draw, max_steps=50):
    name = draw(st.sampled_from(["cosine", "linear_abar"]))
    num_steps = draw(st.one_of(st.sampled_from([1, 2, 10]), st.integers(1, max_steps)))
    return make_schedule(name, num_steps)


@st.composite
def schedule_and_t(draw, max_steps=50, low=1):
    sched = draw(schedules(max_steps))
    return sched, draw(st.integers(low, sched.num_steps))


@st.composite
def respaced_schedules(draw, max_steps=50):
    sched = draw(schedules(max_steps))
    t_max = sched.num_steps
    others = draw(st.sets(st.integers(1, t_max), max_size=t_max)) - {t_max}
    from reference import respace

    return respace(sched, sorted(others) + [t_max])


@st.composite
def conv_geometry(draw, kernels=(1, 3, 5), extra=5):
    """A valid 2-D convolution geometry: kernel, stride, dilation, padding (each per axis), an
    input size just large enough for at least one output (plus up to ``extra``), a pad value."""
    kernel = (draw(st.sampled_from(kernels)), draw(st.sampled_from(kernels)))
    stride = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    dilation = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = []
    for k, d, p in zip(kernel, dilation, padding, strict=True):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        size.append(draw(st.integers(smallest, smallest + extra)))
    return {
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "size": tuple(size),
        "pad_value": draw(st.sampled_from([1.0, 0.0])),
    }
