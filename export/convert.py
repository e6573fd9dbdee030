"""Build an export-ready copy of a refiner: binary layers as custom nodes, step tables, BN folded.

:func:`prepare_refiner` never touches the model it is given. It runs the refiner once on example
inputs with hooks to *observe* the data flow (no assumptions about block classes):

* the output of the step-embedding MLP (:class:`hidiff.embedding.StepEmbedding`) and every
  ``nn.Linear`` that consumes it: each such Linear becomes a :class:`StepTable` with the Linear
  evaluated on the embedding of every step t = 0..T, and the MLP becomes :class:`StepIndex`
  (the graph carries the step index, not an embedding);
* every ``BatchNorm2d`` whose input is the output of a ``BinaryConv2d`` (both called once): the
  batch norm is folded into the conv's per-channel scale and bias and replaced by the identity;
* every time-dependent binarization (TB) whose output feeds only binary layers: its sign is left
  to the binary node (which binarizes its input) and it becomes ``x - a[t]``; any other TB keeps
  its sign, exported as ``Less``/``Where``;
* ``BinaryConv2d`` / ``BinaryLinear`` become one ``ai.hidiff`` node each (+-1 weights stored).

The copy is then checked against the original on the example inputs at every step
(:func:`check_equivalent`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from export.modules import (
    ExportBinaryConv,
    ExportBinaryLinear,
    ExportThreshold,
    StepIndex,
    StepTable,
)
from hidiff.embedding import StepEmbedding
from hidiff.layers import BinaryConv2d, BinaryLinear, TimeBinarization

__all__ = ["ConversionReport", "check_equivalent", "prepare_refiner"]


@dataclass
class ConversionReport:
    """What :func:`prepare_refiner` replaced, by module name in the original refiner."""

    binary_convs: list[str] = field(default_factory=list)
    binary_linears: list[str] = field(default_factory=list)
    folded_batch_norms: dict[str, str] = field(default_factory=dict)  # bn -> conv
    step_tables: list[str] = field(default_factory=list)
    signs_in_binary_nodes: list[str] = field(default_factory=list)  # TB whose sign moved
    signs_kept: list[str] = field(default_factory=list)  # TB exported with Less/Where
    max_abs_diff: float = 0.0  # export copy vs original on the example inputs (logits)

    def custom_ops(self) -> list[str]:
        """The custom op types the export-ready copy emits."""
        ops = []
        if self.binary_convs:
            ops.append("BinaryConv")
        if self.binary_linears:
            ops.append("BinaryLinear")
        return ops

    def summary(self) -> dict:
        """What was folded / replaced, by kind (the files' ``hidiff.folded`` metadata)."""
        return {
            "step_embedding_mlp": "removed; each Linear of its output is a (T+1, C) table "
                                  "gathered by step",
            "step_tables": len(self.step_tables),
            "batch_norms_folded_into_binary_conv": len(self.folded_batch_norms),
            "binary_conv_nodes": len(self.binary_convs),
            "binary_linear_nodes": len(self.binary_linears),
            "tb_signs_done_by_binary_node": len(self.signs_in_binary_nodes),
            "tb_signs_as_less_where": len(self.signs_kept),
        }


@dataclass
class _Observed:
    embed_out: dict[int, str] = field(default_factory=dict)
    conv_out: dict[int, str] = field(default_factory=dict)
    tb_out: dict[int, str] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    linear_inputs: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    bn_inputs: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    tb_consumers: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    keep: list[Tensor] = field(default_factory=list)  # keeps ids unique during the run


def _observe(model: nn.Module, run) -> _Observed:
    obs = _Observed()
    handles = []

    def on_output(table: dict[int, str], name: str):
        def hook(_m, _inp, out):
            obs.calls[name] += 1
            obs.keep.append(out)
            table[id(out)] = name

        return hook

    def on_input(name: str, kind: str):
        def hook(_m, inp):
            x = inp[0] if inp else None
            obs.keep.append(x)
            if kind == "linear":
                obs.linear_inputs[name].add(obs.embed_out.get(id(x), "<other>"))
            elif kind == "bn":
                obs.calls[name] += 1
                obs.bn_inputs[name].add(obs.conv_out.get(id(x), "<other>"))
            if id(x) in obs.tb_out:  # who reads a TB's output decides where its sign goes
                obs.tb_consumers[obs.tb_out[id(x)]].add("binary" if kind == "binary" else "<real>")

        return hook

    for name, m in model.named_modules():
        if isinstance(m, StepEmbedding):
            handles.append(m.register_forward_hook(on_output(obs.embed_out, name)))
        elif isinstance(m, BinaryConv2d):
            handles.append(m.register_forward_pre_hook(on_input(name, "binary")))
            handles.append(m.register_forward_hook(on_output(obs.conv_out, name)))
        elif isinstance(m, BinaryLinear):
            handles.append(m.register_forward_pre_hook(on_input(name, "binary")))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(on_input(name, "linear")))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(on_input(name, "bn")))
        elif isinstance(m, TimeBinarization):
            handles.append(m.register_forward_hook(on_output(obs.tb_out, name)))
        else:
            # any other module consuming a TB output makes that TB keep its sign
            handles.append(m.register_forward_pre_hook(_other_consumer(obs)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return obs


def _other_consumer(obs: _Observed):
    def hook(_m, inp):
        for x in inp:
            if isinstance(x, Tensor) and id(x) in obs.tb_out:
                obs.tb_consumers[obs.tb_out[id(x)]].add("<real>")

    return hook


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def prepare_refiner(
    refiner: nn.Module,
    example_inputs: Sequence,
    num_steps: int,
) -> tuple[nn.Module, ConversionReport]:
    """An eval-mode, export-ready copy of ``refiner`` and a report of what was replaced.

    ``example_inputs`` are the arguments of ``refiner.forward`` (``x, y_t, prior, features, t``).
    ``num_steps`` is T: step tables have T + 1 rows (t = 0..T, indexed by the original step).
    """
    model = copy.deepcopy(refiner).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    obs = _observe(model, lambda m: m(*example_inputs))
    modules = dict(model.named_modules())
    report = ConversionReport()

    embeds = sorted(set(obs.embed_out.values()))
    step_linears = sorted(
        name
        for name, sources in obs.linear_inputs.items()
        if sources and "<other>" not in sources
    )
    mixed = [n for n, s in obs.linear_inputs.items() if len(s) > 1 and "<other>" in s]
    if mixed:
        raise RuntimeError(f"linear layers fed by the step embedding and by other tensors: {mixed}")
    tables: dict[str, StepTable] = {}
    with torch.no_grad():
        steps = torch.arange(0, num_steps + 1, dtype=torch.long)
        emb_tables = {name: modules[name](steps) for name in embeds}
        for name in step_linears:
            (source,) = obs.linear_inputs[name]
            tables[name] = StepTable(modules[name](emb_tables[source]))
    for name in embeds:
        _set(model, name, StepIndex())

    # time-dependent binarizations: sign moved into the binary node when only binary layers read it
    tb_tables: dict[str, StepTable] = {}
    for name, m in modules.items():
        if isinstance(m, TimeBinarization):
            lin = f"{name}.threshold"
            if lin not in tables:
                raise RuntimeError(f"{name}: its threshold is not a Linear of the step embedding")
            consumers = obs.tb_consumers.get(name, set())
            if consumers == {"binary"}:
                tb_tables[name] = tables.pop(lin)
                report.signs_in_binary_nodes.append(name)
            else:
                report.signs_kept.append(name)
    for name, table in tables.items():
        _set(model, name, table)
        report.step_tables.append(name)
    for name, table in tb_tables.items():
        _set(model, name, ExportThreshold(table))
        report.step_tables.append(f"{name}.threshold")

    # batch norms directly after a binary conv (each called once) fold into the conv's scale/bias
    fold: dict[str, str] = {}
    for bn_name, sources in obs.bn_inputs.items():
        if len(sources) == 1 and obs.calls[bn_name] == 1:
            (conv_name,) = sources
            if conv_name != "<other>" and obs.calls[conv_name] == 1:
                fold[conv_name] = bn_name
    for name, m in modules.items():
        if isinstance(m, BinaryConv2d):
            bn = modules[fold[name]] if name in fold else None
            _set(model, name, ExportBinaryConv(m, bn))
            report.binary_convs.append(name)
            if bn is not None:
                _set(model, fold[name], nn.Identity())
                report.folded_batch_norms[fold[name]] = name
        elif isinstance(m, BinaryLinear):
            _set(model, name, ExportBinaryLinear(m))
            report.binary_linears.append(name)
    report.step_tables.sort()
    return model.eval(), report


def check_equivalent(
    original: nn.Module,
    exported: nn.Module,
    example_inputs: Sequence,
    steps: Sequence[int],
    *,
    rtol: float,
) -> tuple[float, float]:
    """Compare the two refiners' logits over ``steps``.

    Returns ``(fraction, max_abs)``: the fraction of logits differing by more than
    ``rtol * max(1, max|logits|)`` and the largest absolute difference. Float rounding (folded
    batch norms, tables) moves a few values, or flips a rare sign; a wrong replacement moves most.
    """
    x, y_t, prior, features, t = example_inputs
    worst, over, total = 0.0, 0, 0
    with torch.no_grad():
        for s in steps:
            step = torch.full_like(t, int(s))
            a = original(x, y_t, prior, features, step)
            b = exported(x, y_t, prior, features, step)
            diff = (a - b).abs()
            tol = rtol * max(1.0, float(a.abs().max()))
            worst = max(worst, float(diff.max()))
            over += int((diff > tol).sum())
            total += diff.numel()
    return over / max(total, 1), worst
