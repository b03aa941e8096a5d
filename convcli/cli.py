"""The ``convcli`` command line: parse, call the library, render. Nothing else lives here."""

from __future__ import annotations

import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from convcli import __version__
from convcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, ConvcliError
from convcli.hparams import build_spec
from convcli.render import print_result, result_json
from convcli.runs import ENGINES, UPSTREAMS, RunResult, run_backward, run_forward
from convcli.slices import parse_slice, take
from convcli.tensorfile import load_tensors, write_tensors

_state = {"debug": False}
# Typer may use click or its own vendored copy: take the classes from Typer itself.
_UsageError = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


def _error_line(message: str) -> None:
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"[bold red]convcli: error:[/] {escape(message)}"
    )


class ConvcliGroup(TyperGroup):
    """Turns every failure into one ``convcli: error: ...`` line and its exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _state["debug"] = False
        try:
            code = super().main(args, "convcli", complete_var, standalone_mode=False, **extra)
        except _UsageError as error:
            message = error.format_message()
            if message:  # empty when Typer has just printed the help for a bare `convcli`
                hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
                _error_line(message + hint)
            code = EXIT_USAGE
        except typer.Abort:
            code = EXIT_INTERRUPTED
        except ConvcliError as error:
            if _state["debug"]:
                traceback.print_exc()
            _error_line(str(error))
            code = error.exit_code
        except Exception as error:  # the last line of defence: no traceback unless --debug
            if _state["debug"]:
                traceback.print_exc()
            _error_line(f"internal error: {type(error).__name__}: {error} (rerun with --debug)")
            code = EXIT_INTERNAL
        if code == EXIT_INTERRUPTED:
            _error_line("interrupted")
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=ConvcliGroup,
    help="Run and check 2-D convolution layers (NHWC activations, HWIO weights).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        print(f"convcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Run and check 2-D convolution layers (NHWC activations, HWIO weights)."""
    _state["debug"] = debug


# Options shared by forward and backward.
Data = Annotated[
    str | None,
    typer.Argument(
        metavar="DATA",
        help="Data file (.npz, .npy, .h5) holding x, w, b (and dz) under their usual names.",
        show_default=False,
    ),
]
XRef = Annotated[
    str | None, typer.Option("--x", metavar="REF", help="x (n,H,W,Cin) as FILE or FILE:KEY.")
]
WRef = Annotated[
    str | None,
    typer.Option("--w", metavar="REF", help="w (kh,kw,Cin/groups,Cout) as FILE or FILE:KEY."),
]
BRef = Annotated[
    str | None, typer.Option("--b", metavar="REF", help="b (Cout,) or (1,1,1,Cout) as FILE[:KEY].")
]
Stride = Annotated[
    str | None, typer.Option("--stride", metavar="S", help="N or H,W. Default: file, else 1.")
]
Pad = Annotated[
    str | None,
    typer.Option(
        "--pad",
        metavar="P",
        help="N, H,W, TOP,BOTTOM,LEFT,RIGHT, same or valid. Default: file, else 0.",
    ),
]
Dilation = Annotated[
    str | None,
    typer.Option("--dilation", metavar="D", help="N or H,W (1 = none). Default: file, else 1."),
]
Groups = Annotated[
    str | None, typer.Option("--groups", metavar="G", help="Channel groups. Default: file, else 1.")
]
EngineName = Enum("EngineName", {name: name for name in ENGINES}, type=str)
UpstreamName = Enum("UpstreamName", {name: name for name in UPSTREAMS}, type=str)
Engine = Annotated[
    EngineName, typer.Option("--engine", help="fast (vectorized) or reference (plain loops).")
]
Slices = Annotated[
    list[str] | None,
    typer.Option(
        "--slice",
        metavar="EXPR",
        help="Print a slice, e.g. 'z[3,2,1]' or 'dw[:,:,0,1]'; repeatable.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")]
Out = Annotated[
    Path | None,
    typer.Option("--out", metavar="FILE", help="Write the outputs to this .npz or .h5 file."),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")]


def _load(data, refs, required, optional, stride, pad, dilation, groups):
    loaded = load_tensors(data, refs, required=required, optional=optional)
    flags = {"stride": stride, "padding": pad, "dilation": dilation, "groups": groups}
    spec, _ = build_spec(loaded.hparams, flags)
    return loaded, spec


def _finish(result: RunResult, loaded, slice_exprs, as_json: bool, out, force: bool) -> None:
    """Evaluate slices, write --out, print notices and the table or JSON."""
    parsed = [parse_slice(expr) for expr in slice_exprs or []]
    arrays = result.arrays()
    slices = {
        expr.label(result.outputs[0]): take(expr, arrays, result.outputs[0]) for expr in parsed
    }
    if out is not None:
        write_tensors(
            out,
            {name: arrays[name] for name in result.outputs},
            result.hparams,
            force=force,
            protect=loaded.sources,
        )
    messages = Console(stderr=True, highlight=False, soft_wrap=True)
    for notice in result.notices:
        messages.print(f"convcli: note: {escape(notice)}")
    if as_json:
        print(result_json(result, slices))
        return
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # piped output: wide enough that no number is cut
    print_result(console, result, slices)
    if out is not None:
        messages.print(f"wrote {', '.join(result.outputs)} to {escape(str(out))}")


@app.command()
def forward(
    data: Data = None,
    x: XRef = None,
    w: WRef = None,
    b: BRef = None,
    stride: Stride = None,
    pad: Pad = None,
    dilation: Dilation = None,
    groups: Groups = None,
    engine: Engine = EngineName.fast,
    slice_: Slices = None,
    as_json: Json = False,
    out: Out = None,
    force: Force = False,
) -> None:
    """Compute z = conv(x, w) + b and summarise every tensor.

    Example: convcli forward sample_data/conv_example.h5 --slice 'z[3,2,1]'
    """
    loaded, spec = _load(
        data, {"x": x, "w": w, "b": b}, ("x", "w"), ("b",), stride, pad, dilation, groups
    )
    result = run_forward(loaded.arrays, spec, engine=engine.value, origins=loaded.origins)
    _finish(result, loaded, slice_, as_json, out, force)


@app.command()
def backward(
    data: Data = None,
    x: XRef = None,
    w: WRef = None,
    b: BRef = None,
    dz: Annotated[
        str | None,
        typer.Option("--dz", metavar="REF", help="Upstream gradient (n,Ho,Wo,Cout) as FILE[:KEY]."),
    ] = None,
    upstream: Annotated[
        UpstreamName,
        typer.Option("--upstream", help="dz when none is given: z (loss ½‖z‖²), ones, or random."),
    ] = UpstreamName.z,
    seed: Annotated[
        int | None, typer.Option("--seed", metavar="N", help="Seed for --upstream random.")
    ] = None,
    stride: Stride = None,
    pad: Pad = None,
    dilation: Dilation = None,
    groups: Groups = None,
    engine: Engine = EngineName.fast,
    slice_: Slices = None,
    as_json: Json = False,
    out: Out = None,
    force: Force = False,
) -> None:
    """Compute dx, dw, db for an upstream gradient dz and summarise every tensor.

    Example: convcli backward sample_data/conv_example.npz --slice 'dw[:,:,0,1]'
    """
    loaded, spec = _load(
        data,
        {"x": x, "w": w, "b": b, "dz": dz},
        ("x", "w"),
        ("b", "dz"),
        stride,
        pad,
        dilation,
        groups,
    )
    result = run_backward(
        loaded.arrays,
        spec,
        engine=engine.value,
        upstream=upstream.value,
        seed=seed,
        origins=loaded.origins,
    )
    _finish(result, loaded, slice_, as_json, out, force)


def main() -> None:
    """Console-script entry point."""
    app()
