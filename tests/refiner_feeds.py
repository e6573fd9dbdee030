"""Inputs of the exported refiner step for the edge tests: one batch of random images through
the segmentor, and the boundary values of the step's dynamic part."""

from __future__ import annotations

import numpy as np

from edge_runtime.ortutil import make_session


def step_inputs(exported, seed: int = 0, batch: int = 2):
    """Random images, the segmentor's outputs for them and a ``y_t`` drawn from the prior."""
    rng = np.random.default_rng(seed)
    h, w = exported.facts.input_size
    x = rng.standard_normal((batch, exported.facts.in_channels, h, w)).astype(np.float32)
    seg = make_session(exported.files["segmentor"])
    names = [o.name for o in seg.get_outputs()]
    values = dict(zip(names, seg.run(None, {"image": x}), strict=True))
    values["image"] = x
    values["y_t"] = (rng.random(values["prior"].shape) < values["prior"]).astype(np.float32)
    return values


def boundary_values(split, values, step: int, batch: int) -> dict[str, np.ndarray]:
    """The feeds of ``split``'s dynamic part at ``step`` (its static and step parts run)."""
    values = dict(values, step=np.full(batch, step, np.int64))
    for part in (split.static, split.step):
        if part.model is not None:
            out = make_session(part.model).run(part.outputs, {n: values[n] for n in part.inputs})
            values.update(zip(part.outputs, out, strict=True))
    return {n: values[n] for n in split.dynamic.inputs}
