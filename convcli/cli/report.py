"""Rendering checks (:class:`~convcli.run.GradcheckRun`, :class:`~convcli.compare.CompareRun`):
Rich tables, heatmaps, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from convcli.check.gradients import TensorCheck
from convcli.cli.heatmap import print_heatmap
from convcli.cli.render import format_padding, format_pair, print_table
from convcli.compare import CompareRun, TensorComparison
from convcli.engine.operands import x_to_last
from convcli.hparams import format_hparams
from convcli.run import GradcheckRun
from convcli.versioning import versioned

LABELS = {"dx": "dx", "dw": "dw", "db": "db"}


def gradcheck_json(run: GradcheckRun) -> str:
    """The ``--json`` document of a gradcheck run."""
    tolerance = next(
        (check.tolerance for _, check, _ in run.results if check is not None), run.tolerance
    )
    document = {
        "command": "gradcheck",
        "passed": run.passed,
        "mode": run.mode,
        "forward_passes": run.forward_passes,
        "impl": run.impl,
        "signature": run.signature,
        "hints": run.hints,
        "forward_only": run.forward_only,
        "tolerance": None
        if tolerance is None
        else {"eps": tolerance.eps, "rtol": tolerance.rtol, "atol": tolerance.atol},
        "seconds": run.seconds,
        "results": [
            {
                "config": config,
                "passed": error is None and check is not None and check.passed,
                "error": error,
                "mode": None if check is None else check.mode,
                "tensors": {}
                if check is None
                else {name: t.to_json() for name, t in check.tensors.items()},
            }
            for config, check, error in run.results
        ]
        + [result.to_json() for result in run.impl_results],
    }
    return json.dumps(versioned(document), allow_nan=False)


def _verdict(passed: bool) -> Text:
    return Text("PASS", style="bold green") if passed else Text("FAIL", style="bold red")


def print_gradcheck(console: Console, run: GradcheckRun) -> None:
    """Tables for people: per tensor for one check, per configuration for ``--impl``."""
    if run.impl is not None:
        _print_impl(console, run)
        return
    config, check, _ = run.results[0]
    tol = check.tolerance
    table = Table(
        title=f"convcli gradcheck · {check.mode} · {check.forward_passes} forward passes · "
        f"{run.seconds:.2f} s",
        caption=Text(
            f"x {tuple(config['shape'])} · kernel {'x'.join(map(str, config['kernel']))} · "
            f"cout {config['cout']} · "
            + format_hparams({**config, "padding": config["pad"]})
            + "\n"
            f"pass when |analytic - numeric| ≤ atol + rtol·max(|analytic|, |numeric|); "
            f"eps={tol.eps:g}"
        ),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for column in ("tensor", "checked", "max abs err", "max rel err", "tolerance", "result"):
        table.add_column(column, justify="left" if column in ("tensor", "result") else "right")
    tolerance = f"atol {tol.atol:g}, rtol {tol.rtol:g}"
    for name, tensor in check.tensors.items():
        for label, part in ((name, tensor), (f"{name} probes", tensor.probes)):
            if part is None:
                continue
            table.add_row(
                label,
                f"{part.checked}/{part.total}"
                if part.unit == "elements"
                else f"{part.checked} probes",
                f"{part.max_abs_err:.3g}",
                f"{part.max_rel_err:.3g}",
                tolerance,
                _verdict(part.passed),
            )
    print_table(console, table)
    for tensor in check.tensors.values():
        for part in (tensor, tensor.probes):
            if part is not None and not part.passed:
                _print_failure(console, part)
    console.print(
        Text("PASS: every gradient matches", style="bold green")
        if run.passed
        else Text(
            "FAIL: " + ", ".join(n for n, t in check.tensors.items() if not t.passed) + " wrong",
            style="bold red",
        )
    )


def _print_failure(console: Console, check) -> None:
    worst = Table(title=f"{check.name}: worst {check.unit}", box=box.SIMPLE_HEAD, show_edge=False)
    key = "index" if check.unit == "elements" else "probe"
    for column in (key, "analytic", "numeric", "|error|"):
        worst.add_column(column, justify="right")
    for row in check.worst:
        worst.add_row(
            str(tuple(row[key])) if key == "index" else str(row[key]),
            f"{row['analytic']:.10g}",
            f"{row['numeric']:.10g}",
            f"{row['abs_err']:.3g}",
        )
    print_table(console, worst)
    if check.failures_per_channel:
        counts = ", ".join(f"{c}: {k}" for c, k in sorted(check.failures_per_channel.items()))
        axis = "input channel" if check.name == "dx" else "output channel"
        failed = int(check.failed.sum()) if check.failed is not None else 0
        console.print(
            Text(
                f"{check.name}: {failed} of {check.checked} checked elements fail; "
                f"per {axis}: {counts}"
            )
        )
    picture = check.error_map()
    if picture is not None and check.checked == check.total:
        values, title = picture
        print_heatmap(console, values, title)


IMPL_COLUMNS = {
    "forward_vs_engine": "forward\nvs engine",
    "backward_vs_numeric": "backward\nvs numeric",
    "backward_vs_engine": "backward\nvs engine",
}
REFERENCES = {
    "forward_vs_engine": "convcli's engine",
    "backward_vs_numeric": "numerical gradients of your conv_forward",
    "backward_vs_engine": "convcli's engine",
}


def _impl_verdict(passed: bool | None) -> Text:
    return Text("n/a", style="dim") if passed is None else _verdict(passed)


def _print_impl(console: Console, run: GradcheckRun) -> None:
    """One row per configuration with its three verdicts; below, each failing or printing
    configuration's diagnosis, reason and output; then the worst elements of the first."""
    table = Table(
        title=f"gradcheck --impl {Path(run.impl or '').name} · {run.signature}"
        + (" · forward only" if run.forward_only else "")
        + (f" · {run.mode} mode" if run.mode != "exhaustive" else "")
        + f" · {_count(len(run.impl_results), 'configuration')} · {run.seconds:.2f} s",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    # on a narrow terminal the numbers and verdicts stay whole; the shape columns give way
    table.add_column("#", no_wrap=True, min_width=len(str(len(run.impl_results))))
    # dilation and groups only when some configuration has them (the callable signature's)
    wide = any(r.config.dilation != 1 or r.config.groups != 1 for r in run.impl_results)
    for column in ("shape", "kernel", "cout", "stride", "pad") + (("dil", "groups") * wide):
        table.add_column(column, no_wrap=True)
    for column in IMPL_COLUMNS.values():
        table.add_column(column, no_wrap=True, min_width=4)
    for number, result in enumerate(run.impl_results, start=1):
        config = result.config.to_json(result.layout)
        table.add_row(
            str(number),
            "x".join(map(str, config["shape"])),
            "x".join(map(str, config["kernel"])),
            str(config["cout"]),
            format_pair(config["stride"]),
            format_padding(config["pad"]),
            *((format_pair(config["dilation"]), str(config["groups"])) * wide),
            *(_impl_verdict(result.checks[name].passed) for name in IMPL_COLUMNS),
        )
    print_table(console, table)
    for number, result in enumerate(run.impl_results, start=1):
        if result.passed and not result.output:
            continue
        config = result.config
        shown = config.to_json(result.layout)
        extra = f", dilation {format_pair(shown['dilation'])}" if config.dilation != 1 else ""
        extra += f", groups {config.groups}" if config.groups != 1 else ""
        console.print(
            Text(
                f"configuration {number} ({'x'.join(map(str, shown['shape']))}, "
                f"kernel {'x'.join(map(str, config.kernel))}, cout {config.cout}, "
                f"stride {format_pair(shown['stride'])}, pad {format_padding(shown['pad'])}"
                f"{extra}): "
                f"{'PASS' if result.passed else 'FAIL'}",
                style="bold",
            )
        )
        if not result.passed:
            console.print(Text(f"  {result.diagnosis}"))
            console.print(Text(f"  reason: {result.error}", style="dim"))
        if result.output:
            console.print(Text("  printed:"))
            lines = result.output.rstrip("\n").splitlines()
            for line in lines[:20]:
                console.print(Text(f"    {line}"), soft_wrap=True)
            if len(lines) > 20:
                console.print(Text(f"    ... {len(lines) - 20} more lines (all in --json)"))
    failing = next((result for result in run.impl_results if not result.passed), None)
    if failing is not None:
        number = run.impl_results.index(failing) + 1
        for name, check in failing.checks.items():
            for comparison in check.failing():
                _print_comparison(console, number, comparison, REFERENCES[name])
    passed = sum(1 for result in run.impl_results if result.passed)
    total = len(run.impl_results)
    style = "bold green" if passed == total else "bold red"
    verb = "passes" if total == 1 else "pass"
    console.print(Text(f"{passed} of {_count(total, 'configuration')} {verb}", style=style))
    for hint in run.hints:
        console.print(Text(f"hint: {hint}", style="yellow"))


def _print_comparison(console: Console, number: int, comparison, reference: str) -> None:
    title = f"configuration {number}: {comparison.name} against {reference}, worst elements"
    print_table(console, _worst_table(title, comparison.worst, "expected"))
    console.print(
        Text(
            f"{comparison.name}: {comparison.failed} of {comparison.checked} elements fail, "
            f"{comparison.where}"
        )
    )


# -- compare ---------------------------------------------------------------------------------


def compare_json(run: CompareRun) -> str:
    """The ``--json`` document of a comparison: per tensor, gradcheck's tensor entry plus
    shape, expected_shape, dtype, reduction, tolerance, origin and diagnosis."""
    document = {
        "command": "compare",
        "passed": run.passed,
        "hparams": run.hparams,
        "upstream": run.upstream,
        "seconds": run.seconds,
        "tensors": {name: t.to_json() for name, t in run.tensors.items()},
    }
    return json.dumps(versioned(document), allow_nan=False, default=str)


def print_compare(console: Console, run: CompareRun) -> None:
    """A row per tensor; under it, each failing tensor's worst elements, failures per
    channel, |error| heatmap and diagnosis; then the verdict."""
    table = Table(
        title=f"convcli compare · {', '.join(run.tensors)} · {run.seconds:.2f} s",
        caption=Text(
            format_hparams(run.hparams) + "\npass when |yours - convcli's| ≤ atol + rtol·Σ|terms|, "
            "rtol = 2·eps(dtype)·√K (K products per element)"
            + ("" if run.upstream is None else f"\ndx, dw, db for {run.upstream}")
        ),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for column in ("tensor", "dtype", "K", "max abs err", "max rel err", "tolerance", "result"):
        table.add_column(column, justify="left" if column in ("tensor", "result") else "right")
    for name, tensor in run.tensors.items():
        check = tensor.check
        table.add_row(
            name,
            tensor.dtype,
            str(tensor.reduction),
            *(
                (f"{check.max_abs_err:.3g}", f"{check.max_rel_err:.3g}")
                if check.checked
                else ("wrong shape", "")
            ),
            f"rtol {tensor.tolerance.rtol:.2g}, atol {tensor.tolerance.atol:.2g}",
            _verdict(check.passed),
        )
    print_table(console, table)
    for tensor in run.tensors.values():
        if not tensor.passed:
            _print_mismatch(console, tensor)
    failing = [name for name, t in run.tensors.items() if not t.passed]
    console.print(
        Text("PASS: every tensor matches convcli's", style="bold green")
        if not failing
        else Text("FAIL: " + ", ".join(failing) + " differ from convcli's", style="bold red")
    )


def _print_mismatch(console: Console, tensor: TensorComparison) -> None:
    check = tensor.check
    if tuple(tensor.shape) != tuple(check.shape):
        console.print(
            Text(
                f"{check.name} ({tensor.origin}) has shape {tensor.shape}; "
                f"convcli's has shape {check.shape}"
            )
        )
    else:
        print_table(console, _worst_table(f"{check.name}: worst elements", check.worst, "convcli"))
        failed = 0 if check.failed is None else int(check.failed.sum())
        counts = ", ".join(f"{c}: {k}" for c, k in sorted(check.failures_per_channel.items()))
        axis = "input channel" if check.name == "dx" else "output channel"
        console.print(
            Text(
                f"{check.name} ({tensor.origin}): {failed} of {check.total} elements fail; "
                f"per {axis}: {counts}"
            )
        )
        picture = _error_map(check)
        if picture is not None:
            print_heatmap(console, *picture)
    if tensor.diagnosis is not None:
        style = "bold" if tensor.diagnosis.matches else "dim"
        console.print(Text(f"diagnosis: {tensor.diagnosis.sentence}", style=style))


def _error_map(check: TensorCheck) -> tuple[np.ndarray, str] | None:
    """|error| over (H, W) for z and dx, (kh, kw) for dw, in the channel with most failures."""
    if check.name != "z":
        return check.error_map()
    if check.abs_errors is None or len(check.shape) != 4:
        return None
    errors = x_to_last(np.nan_to_num(check.abs_errors, nan=0.0), check.layout)
    failures = check.failures_per_channel
    channel = max(failures, key=lambda c: failures[c]) if failures else 0
    return errors[..., channel].max(axis=0), f"|error| of z over (H, W), channel {channel}"


def _count(number: int, noun: str) -> str:
    """``"1 configuration"``, ``"18 configurations"``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _worst_table(title: str, rows: list[dict], reference: str) -> Table:
    """The worst elements of a comparison (``index``, ``yours``, ``expected``, ``abs_err``
    rows), the reference's column headed ``reference``."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("index", "yours", reference, "|error|"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(tuple(row["index"])),
            f"{row['yours']:.10g}",
            f"{row['expected']:.10g}",
            f"{row['abs_err']:.3g}",
        )
    return table
