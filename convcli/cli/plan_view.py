"""Rendering a :class:`~convcli.plan.StackPlan` (``convcli plan``): Rich tables, or JSON."""

from __future__ import annotations

import json

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from convcli.cli.render import print_table
from convcli.hparams import format_hparams
from convcli.plan import LayerPlan, StackPlan
from convcli.units import format_size
from convcli.versioning import versioned


def plan_json(stack: StackPlan, source: str) -> str:
    """The ``--json`` document: ``{"schema_version", "command", "source", "layers", "totals"}``."""
    return json.dumps(versioned({"command": "plan", "source": source, **stack.to_json()}))


def print_plan(console: Console, stack: StackPlan, source: str) -> None:
    """One layer: its axes, tensors, work and memory; a stack: a row per layer and totals."""
    if len(stack.layers) == 1:
        _print_layer(console, stack.layers[0].plan, source)
    else:
        _print_stack(console, stack, source)


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def _shape(shape) -> str:
    return "x".join(str(v) for v in shape)


def _print_layer(console: Console, plan: LayerPlan, source: str) -> None:
    shapes = plan.shapes
    console.print(
        Text(f"convcli plan · {source} · x {shapes['x']} → z {shapes['z']}"), soft_wrap=True
    )
    names = [axis.axis for axis in plan.axes]
    axes = _table("axis", *names, right=tuple(names))
    fields = dict(zip(names, plan.receptive_field, strict=True))
    transposed = plan.geometry.transposed
    rows = (
        ("input", lambda a: a.size),
        ("kernel", lambda a: a.kernel),
        ("dilation", lambda a: a.dilation),
        ("receptive field", lambda a: fields[a.axis]),
        ("stride", lambda a: a.stride),
        # a transposed layer's padding crops its output
        ("cropped" if transposed else "padding", lambda a: f"{a.padding[0]}+{a.padding[1]}"),
        ("output", lambda a: a.out),
        ("never read", lambda a: a.unread),
        *((("no input reaches", lambda a: a.unreached),) if transposed else ()),
    )
    for label, cell in rows:
        axes.add_row(label, *(str(cell(axis)) for axis in plan.axes))
    print_table(console, axes)
    console.print()
    tensors = _table("tensor", "shape", "bytes", right=("bytes",))
    for name, shape in plan.shapes.items():
        tensors.add_row(name, str(shape), format_size(plan.tensors[name]))
    print_table(console, tensors)
    console.print()
    work = _table("pass", "MACs", "FLOPs", right=("MACs", "FLOPs"))
    for label, macs, flops in (
        ("forward", plan.macs.forward, plan.flops.forward),
        ("backward dx", plan.macs.backward_dx, plan.flops.backward_dx),
        ("backward dw", plan.macs.backward_dw, plan.flops.backward_dw),
        ("total", plan.macs.total, plan.flops.total),
    ):
        work.add_row(label, f"{macs:,}", f"{flops:,}")
    print_table(console, work)
    console.print()
    runs = list(plan.needs)
    memory = _table("memory", *runs, right=tuple(runs))
    kinds = list(dict.fromkeys(kind for needs in plan.needs.values() for kind in needs))
    for kind in kinds:
        cells = [plan.needs[run].get(kind) for run in runs]
        memory.add_row(kind, *(format_size(size) if size is not None else "" for size in cells))
    memory.add_section()
    memory.add_row("total", *(format_size(sum(plan.needs[run].values())) for run in runs))
    print_table(console, memory)
    lines = [
        f"{format_hparams(plan.geometry.hparams())} · {plan.dtype} · "
        f"engine workspace {format_size(plan.workspace)}",
        f"parameters {plan.parameters:,} ({plan.weights:,} weights + {plan.biases:,} "
        f"bias{'' if plan.biases == 1 else 'es'})",
        _unread_line(plan),
        *([_unreached_line(plan)] if transposed else []),
        "FLOPs = 2 x MACs; bias additions not counted"
        + (f" ({plan.bias_adds:,} in forward, as many for db)" if plan.bias else ""),
        f"gradcheck: exhaustive takes {plan.gradcheck_passes:,} forward passes; "
        f"auto would choose {plan.gradcheck_auto}",
    ]
    for line in lines:
        console.print(Text(line), soft_wrap=True)


def _unreached_line(plan: LayerPlan) -> str:
    """A transposed layer's outputs no input reaches (they hold the bias alone)."""
    if not plan.unreached_pixels:
        return (
            f"every output pixel is reached by some input ({plan.output_pixels:,} per image "
            "and channel)"
        )
    axes = ", ".join(f"{a.unreached} along {a.axis}" for a in plan.axes if a.unreached)
    return (
        f"no input reaches: {plan.unreached_pixels:,} of {plan.output_pixels:,} output pixels "
        f"per image and channel hold the bias alone ({axes}: a stride longer than the "
        "kernel's span, or an output_padding at least the stride)"
    )


def _unread_line(plan: LayerPlan) -> str:
    if not plan.unread_pixels:
        return f"every input pixel is read ({plan.input_pixels:,} per image and channel)"
    ends = "cropped whole by the padding" if plan.geometry.transposed else "beyond every window"
    axes = []
    for axis in plan.axes:
        parts = [
            *([f"{axis.unread_gaps} in gaps between windows"] if axis.unread_gaps else []),
            *([f"{axis.unread_border} at the ends, {ends}"] if axis.unread_border else []),
        ]
        if parts:
            axes.append(f"along {axis.axis}: {', '.join(parts)}")
    return (
        f"never read: {plan.unread_pixels:,} of {plan.input_pixels:,} input pixels per image "
        f"and channel ({'; '.join(axes)})"
    )


def _print_stack(console: Console, stack: StackPlan, source: str) -> None:
    numbers = ("params", "MACs fwd", "FLOPs fwd")
    console.print(Text(f"convcli plan · {source} · {len(stack.layers)} layers"), soft_wrap=True)
    table = _table(
        "#",
        "x",
        "kernel",
        "stride",
        "pad",
        "z",
        "RF",
        "jump",
        *numbers,
        right=("#", *numbers),
    )
    for index, layer in enumerate(stack.layers, start=1):
        plan = layer.plan
        table.add_row(
            str(index),
            _shape((*plan.geometry.in_sizes, plan.geometry.cin)),
            _shape(plan.geometry.kernel) + (" T" if plan.geometry.transposed else ""),
            _shape(plan.geometry.stride),
            ",".join(f"{lo}+{hi}" for lo, hi in plan.geometry.pads),
            _shape((*plan.geometry.out_sizes, plan.geometry.cout)),
            _shape(layer.receptive_field),
            _shape(layer.jump),
            f"{plan.parameters:,}",
            f"{plan.macs.forward:,}",
            f"{plan.flops.forward:,}",
        )
    table.add_section()
    last = stack.layers[-1]
    table.add_row(
        "total",
        "",
        "",
        "",
        "",
        "",
        _shape(last.receptive_field),
        _shape(last.jump),
        f"{stack.parameters:,}",
        f"{stack.macs.forward:,}",
        f"{stack.flops.forward:,}",
    )
    print_table(console, table)
    n = stack.layers[0].plan.geometry.n
    lines = [
        f"shapes channels last, without the batch (n={n}); RF: receptive field on the input; "
        "jump: input pixels between neighbouring outputs"
        + (
            "; T: transposed (its stride divides the jump, its pad crops z)"
            if any(layer.plan.geometry.transposed for layer in stack.layers)
            else ""
        ),
        f"backward: {stack.macs.backward_dx:,} MACs for dx and {stack.macs.backward_dw:,} for "
        f"dw; FLOPs = 2 x MACs; bias additions not counted",
    ]
    for index, layer in enumerate(stack.layers, start=1):
        if layer.plan.unread_pixels:
            lines.append(f"layer {index}: {_unread_line(layer.plan)}")
        if layer.plan.unreached_pixels:
            lines.append(f"layer {index}: {_unreached_line(layer.plan)}")
    for line in lines:
        console.print(Text(line), soft_wrap=True)
