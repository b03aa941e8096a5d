"""Rendering a :class:`~convcli.run.RunResult`: a Rich table for people, JSON for scripts."""

from __future__ import annotations

import json
import math

import numpy as np
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from convcli.cli.messages import one_line
from convcli.hparams import BY_NAME, format_hparams
from convcli.run import RunResult, Upstream
from convcli.sweep import record_verdict
from convcli.versioning import versioned


def result_json(
    result: RunResult, slices: dict[str, np.ndarray], heatmaps: dict | None = None
) -> str:
    """The ``--json`` document (command, hparams, engine, tensors, slices, heatmaps, ...)."""
    tensors = {}
    for name, tensor in result.tensors.items():
        tensors[name] = {
            "role": tensor.role,
            "origin": origin_text(tensor.origin),
            **tensor.summary(),
        }
    document = {
        "command": result.command,
        "hparams": result.hparams,
        "engine": result.engine,
        "tensors": tensors,
        "slices": {label: _jsonable(value) for label, value in slices.items()},
        "heatmaps": {label: _jsonable(value) for label, value in (heatmaps or {}).items()},
        "seconds": result.seconds,
        "streamed": result.streamed,
    }
    return json.dumps(versioned(document), allow_nan=False)


def origin_text(origin: str | Upstream) -> str:
    """Where a tensor came from, in the command line's words (a made dz: the flags that made it)."""
    if isinstance(origin, Upstream):
        seed = f" --seed {origin.seed}" if origin.mode == "random" else ""
        return f"--upstream {origin.mode}{seed}"
    return origin


def _jsonable(value: np.ndarray):
    value = np.asarray(value, dtype=np.float64)
    if np.isfinite(value).all():
        return value.tolist()
    return _finite_or_none(value.tolist())


def _finite_or_none(item):
    """Nested lists of floats with NaN and ±Inf as None (JSON has no such numbers)."""
    if isinstance(item, list):
        return [_finite_or_none(v) for v in item]
    return item if math.isfinite(item) else None


def _number(value) -> str:
    return "—" if value is None else f"{value:.5g}"


def result_table(result: RunResult) -> Table:
    """One row per tensor: name, shape, dtype, mean (full precision), std, min, max.

    Inputs come first, then a rule, then outputs.

    The caption gives the resolved hyperparameters, the engine, the time, and where each
    input tensor came from.
    """
    h = result.hparams
    sources = "\n".join(
        f"{name} ← {one_line(origin_text(tensor.origin))}"
        for name, tensor in result.tensors.items()
        if tensor.role == "input"
    )
    caption = (
        f"{format_hparams(h)} · engine={result.engine} · {result.seconds * 1e3:.1f} ms\n{sources}"
    )
    table = Table(
        title=f"convcli {result.command}",
        caption=Text(caption),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("tensor", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    for column in ("mean", "std", "min", "max"):
        table.add_column(column, justify="right", no_wrap=True)
    summaries = {name: tensor.summary() for name, tensor in result.tensors.items()}
    show_nonfinite = any(s["nonfinite"] for s in summaries.values())
    if show_nonfinite:
        table.add_column("NaN/Inf", justify="right", no_wrap=True)
    for role in ("input", "output"):
        for name, tensor in result.tensors.items():
            if tensor.role != role:
                continue
            s = summaries[name]
            row = [
                name,
                str(tuple(s["shape"])),
                s["dtype"],
                "—" if s["mean"] is None else repr(s["mean"]),
                _number(s["std"]),
                _number(s["min"]),
                _number(s["max"]),
            ]
            table.add_row(*row, *([f"{s['nonfinite']:,}"] if show_nonfinite else []))
        table.add_section()
    return table


def _used_as(entry: dict, layers: dict) -> str:
    """An inspect row's use: its role, or ``"w of conv1"`` for a layer's weight."""
    name = entry.get("layer")
    if entry["role"] or name is None:
        return entry["role"] or ""
    return f"{'w' if layers[name]['weight'] == entry['key'] else 'b'} of {name}"


def format_pair(values) -> str:
    """Per-axis values in one word: ``[2, 2]`` -> ``2``, ``[1, 2]`` -> ``1,2``."""
    return BY_NAME["stride"].format(values)


def format_padding(pads) -> str:
    """((1, 1), (1, 1)) -> "1"; ((1, 1), (0, 0)) -> "1,0"; otherwise every before,after."""
    return BY_NAME["padding"].format(pads)


def print_table(console: Console, table: Table) -> None:
    """Print ``table``, or, when its columns do not fit the console's width, the same cells
    stacked: one line per cell (``column: value``) under each row's first cell.

    Numbers are never cut: a table that fits is printed whole (its columns are sized to
    their contents), and the stacked layout prints each line unwrapped (``soft_wrap``), so
    a narrow terminal folds long lines rather than convcli dropping characters.
    """
    caption, table.caption = table.caption, None  # printed below, never wrapped to the table
    unbounded = console.options.update_width(1 << 20)  # the width the table would like
    if Measurement.get(console, unbounded, table).maximum <= console.width:
        console.print(table)
    else:
        _print_stacked(console, table)
    if caption:
        console.print(_text(caption), soft_wrap=True)


def _print_stacked(console: Console, table: Table) -> None:
    if table.title:
        console.print(_text(table.title), soft_wrap=True)
    headers = [_text(column.header).plain.replace("\n", " ") for column in table.columns]
    cells = [list(column.cells) for column in table.columns]
    for row in range(table.row_count):
        values = [_text(column[row]) for column in cells]
        console.print(values[0], soft_wrap=True)
        for header, value in zip(headers[1:], values[1:], strict=True):
            if value.plain:
                console.print(Text(f"  {header}: ").append_text(value), soft_wrap=True)


def _text(cell: object) -> Text:
    """A table cell, title or caption as Text (strings are text, never markup)."""
    return cell if isinstance(cell, Text) else Text(str(cell))


def print_result(console: Console, result: RunResult, slices: dict[str, np.ndarray]) -> None:
    """Print the table, then each requested slice (lines no wider than the console, or one
    number per line; never a number cut in two)."""
    print_table(console, result_table(result))
    for label, value in slices.items():
        console.print(Text(f"{label} ="), soft_wrap=True)
        text = np.array2string(np.asarray(value), max_line_width=console.width)
        console.print(Text(text), soft_wrap=True)


def print_inventory(console: Console, report: dict) -> None:
    """``convcli inspect``: one row per array, then the hyperparameters it would use."""
    table = Table(
        title=f"{one_line(report['file'])} ({report['format']})",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for column in ("key", "shape", "dtype", "bytes", "used as"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    for entry in report["tensors"]:
        if entry["dtype"] is None:  # not read by convcli: its refusal is among the problems
            table.add_row(Text(one_line(entry["key"])), "", "unreadable", "", "")
            continue
        table.add_row(
            Text(one_line(entry["key"]) or "(unnamed)"),
            str(tuple(entry["shape"])),
            entry["dtype"]
            + (f" (stored {entry['stored_dtype']})" if "stored_dtype" in entry else ""),
            f"{entry['bytes']:,}",
            one_line(_used_as(entry, report.get("layers", {}))),
        )
    print_table(console, table)
    if report.get("metadata"):
        pairs = ", ".join(one_line(f"{name}={value}") for name, value in report["metadata"].items())
        console.print(Text(f"metadata: {pairs}"))
    h = report["hparams"]
    if h:
        stored = [k for k, v in report["origins"].items() if v != "default"]
        where = f"{', '.join(stored)} from the file" if stored else "all defaults"
        console.print(Text(f"hyperparameters: {format_hparams(h)} ({where})"))
    for problem in report["problems"]:
        console.print(Text(f"problem: {problem}"))


MAX_SWEEP_ROWS = 50


def print_sweep(console: Console, summary) -> None:
    """``convcli sweep``: a row per configuration (first MAX_SWEEP_ROWS), then the counts."""
    table = Table(
        title=f"convcli sweep {summary.spec} → {summary.out}",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    extra = [
        key
        for key, default in (
            ("padding_mode", "zeros"),
            ("layout", "nhwc"),
            ("transposed", 0),
            ("output_padding", 0),
        )
        if any(r["config"].get(key, default) not in (default, [default]) for r in summary.records)
    ]
    # a transposed layer is marked T; output_padding (op) only when some layer has one
    headers = {
        "padding_mode": "mode",
        "layout": "layout",
        "transposed": "T",
        "output_padding": "op",
    }
    columns = ["#", "shape", "kernel", "cout", "stride", "pad", "dil", "groups"]
    columns += [headers[key] for key in extra]
    for column in (*columns, "dtype", "status", "gradcheck", "s"):
        table.add_column(column, justify="right" if column in ("#", "cout", "s") else "left")
    table.add_column("error", overflow="fold")
    for number, record in enumerate(summary.records[:MAX_SWEEP_ROWS], start=1):
        c = record["config"]
        gradcheck = record.get("gradcheck")
        verdict = "" if not gradcheck else ("PASS" if gradcheck["passed"] else "FAIL")
        status = record_verdict(record)
        table.add_row(
            str(number),
            "x".join(map(str, c["shape"])),
            "x".join(map(str, c["kernel"])),
            str(c["cout"]),
            str(c["stride"]),
            str(c["pad"]),
            str(c["dilation"]),
            str(c["groups"]),
            *(_extra_cell(key, c) for key in extra),
            c["dtype"],
            Text(status, style="green" if status == "passed" else "red"),
            Text(verdict, style="bold green" if verdict == "PASS" else "bold red"),
            f"{record.get('seconds') or 0:.2f}",
            Text(record.get("error") or ""),
        )
    print_table(console, table)
    if len(summary.records) > MAX_SWEEP_ROWS:
        console.print(Text(f"… and {len(summary.records) - MAX_SWEEP_ROWS} more in {summary.out}"))
    data = summary.to_json()
    counts = data["counts"]
    console.print(
        Text(
            f"{data['total']} configuration{'' if data['total'] == 1 else 's'}: "
            f"{data['ran']} run, {data['skipped']} already in "
            f"{summary.out}; {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['errored']} errored · spec {summary.fingerprint} · {summary.seconds:.1f} s",
            style="bold green" if data["passed"] else "bold red",
        ),
        soft_wrap=True,  # one line, for people and for grep
    )


def _extra_cell(key: str, config: dict) -> str:
    """A sweep row's cell for an optional column: T for a transposed layer, op as a pair."""
    value = config.get(key)
    if key == "transposed":
        return "T" if value else ""
    if key == "output_padding":
        return "" if value is None else format_pair(value)
    return "" if value is None else str(value)
