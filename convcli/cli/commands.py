"""The ``convcli`` command line: parse, call the library, render. Nothing else lives here."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, TextIO, cast

import numpy as np
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from convcli import __version__
from convcli.check.gradients import DEFAULT_PROBES, DEFAULT_SAMPLES
from convcli.check.tolerance import DEFAULT_ATOL, DEFAULT_EPS, DEFAULT_RTOL, Tolerance
from convcli.cli.heatmap import print_heatmap
from convcli.cli.messages import ASCII_ERRORS, explain, flag_for, one_line, out_of_memory
from convcli.cli.plan_view import plan_json, print_plan
from convcli.cli.render import print_inventory, print_result, print_sweep, result_json
from convcli.cli.report import compare_json, gradcheck_json, print_compare, print_gradcheck
from convcli.cli.slices import check_slice, parse_slice, take
from convcli.compare import run_compare
from convcli.errors import (
    EXIT_CHECK_FAILED,
    EXIT_DATA,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    ConvcliError,
    ConvcliNotice,
    HyperparameterError,
    Terminated,
    UsageError,
)
from convcli.examples import write_examples
from convcli.generate import check_generated_memory, generate_layer
from convcli.hparams import BY_NAME, HPARAMS, build_spec
from convcli.inspection import inspect_file
from convcli.io.loading import load_tensors
from convcli.io.writing import write_tensors
from convcli.memory import check_disk, parse_memory
from convcli.plan import StackPlan, layer_shapes, plan_file, plan_layer, plan_stack
from convcli.run import (
    GradcheckRun,
    ImplLayer,
    RunInputs,
    RunOptions,
    RunResult,
    Upstream,
    expected_shapes,
    header_check,
    run_backward,
    run_forward,
    run_gradcheck,
    run_impl_check,
)
from convcli.sweep import MAX_CONFIGS, SweepOptions, load_sweep, run_sweep
from convcli.units import parse_size
from convcli.versioning import versioned

_state = {"debug": False, "quiet": False}
# Typer may use click or its own vendored copy: take the classes from Typer itself.
_UsageError = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


def _console(*, stderr: bool = False, **options) -> Console:
    """Every console of the command line: text is never read as markup, highlighted or given
    emoji, so a file named ``[bold]x.h5`` prints as itself in tables, notes and errors."""
    console_class = Console if stderr else _DataConsole
    return console_class(stderr=stderr, markup=False, highlight=False, emoji=False, **options)


def _error_line(message: str) -> None:
    """The one ``convcli: error:`` line: control characters escaped, length capped."""
    line = Text("convcli: error:", style="bold red").append(" " + one_line(message), style="")
    _console(stderr=True, soft_wrap=True).print(line)


def _note(console: Console, text: str) -> None:
    console.print(Text("convcli: note: " + one_line(text)))


def _ascii_fallback() -> None:
    """Let stdout and stderr print what their encoding lacks (an ASCII-only locale) in ASCII
    spellings (``<-`` for an arrow) or escapes, never failing; Rich draws ASCII tables."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors=ASCII_ERRORS)


_SIGNALLED = {EXIT_INTERRUPTED: "interrupted", EXIT_TERMINATED: "terminated"}


def _ignore_unraisable(_unraisable) -> None:
    """An ``sys.unraisablehook`` that prints nothing."""


class ConvcliGroup(TyperGroup):
    """Turns every failure into one ``convcli: error: ...`` line and its exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _state["debug"] = _state["quiet"] = False
        _ascii_fallback()
        stdout = sys.stdout
        if stdout is not None:
            sys.stdout = cast("TextIO", _PipeSafe(stdout))
        try:
            code = self._run(args, complete_var, **extra)
            _flush_stdout()  # what is still buffered; a reader that went away is no error
        finally:
            sys.stdout = stdout
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args, complete_var, **extra):
        """Run the command; every outcome becomes an exit code (and at most one line)."""
        try:
            with np.errstate(all="ignore"):  # NaN/Inf show up in the statistics instead
                code = super().main(args, "convcli", complete_var, standalone_mode=False, **extra)
        except _UsageError as error:
            message = error.format_message()
            if message:  # empty when Typer has just printed the help for a bare `convcli`
                hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
                _error_line(message + hint)
            code = EXIT_USAGE
        except (typer.Abort, Terminated) as error:
            # Ctrl-C can land inside a constructor (a ZipFile half built by np.load); its
            # __del__ then fails when the traceback is released. We are exiting: stay quiet.
            if not _state["debug"]:
                sys.unraisablehook = _ignore_unraisable
            code = EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED
        except ConvcliError as error:
            if _state["debug"]:
                traceback.print_exc()
            _error_line(explain(error))
            code = error.exit_code
        except MemoryError as error:  # an allocation the estimates before the work missed
            if _state["debug"]:
                traceback.print_exc()
            _error_line(out_of_memory(error))
            code = EXIT_DATA
        except Exception as error:  # the last line of defence: no traceback unless --debug
            if _state["debug"]:
                traceback.print_exc()
            _error_line(f"internal error: {type(error).__name__}: {error} (rerun with --debug)")
            code = EXIT_INTERNAL
        if code in _SIGNALLED:
            if not _state["debug"]:
                sys.unraisablehook = _ignore_unraisable
            _error_line(_SIGNALLED[code])
        return code if isinstance(code, int) else 0


class _PipeSafe:
    """stdout as every writer sees it (print, Rich, Typer's help): when its reader has gone
    (a closed pipe, ``| head -1``), the rest of the output is dropped instead of raising, so
    the command finishes with its own exit code and nothing is printed about it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _silence_stdout()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _silence_stdout()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


app = typer.Typer(
    cls=ConvcliGroup,
    help="Run and check 1-D to 3-D convolution layers, channels last or first.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _silence_stdout() -> None:
    """Point stdout's file descriptor at the null device.

    Called when the reader of stdout has gone (``convcli ... | head -c 10``): the rest of the
    data output is dropped, and the interpreter's final flush has nothing left to fail on, so
    no "Exception ignored" message appears and the exit code stays the command's.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stream (None, or a test's buffer)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _flush_stdout() -> None:
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


@contextlib.contextmanager
def _data_output():
    """Around writing data to stdout: a closed or broken stdout ends the output, never the
    command — the exit code stays the verdict (0 or 1)."""
    try:
        yield
    except BrokenPipeError:
        _silence_stdout()
    _flush_stdout()


class _DataConsole(Console):
    """Rich's console for data on stdout, minus Rich's exit(1) on a broken pipe."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _silence_stdout()


def _version(value: bool) -> None:
    if value:
        with _data_output():
            print(f"convcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No notes, progress bars or 'wrote' messages on stderr."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Run and check 1-D to 3-D convolution layers, channels last or first."""
    _state["debug"] = debug
    _state["quiet"] = quiet


# Options shared by forward and backward.
Data = Annotated[
    str | None,
    typer.Argument(
        metavar="DATA",
        help=(
            "Data file (.npz, .npy, .h5, .safetensors) holding x, w, b (and dz) under their "
            "usual names."
        ),
        show_default=False,
    ),
]
XRef = Annotated[
    str | None,
    typer.Option(
        "--x", metavar="REF", help="x (n,*spatial,Cin; nchw: n,Cin,*spatial) as FILE[:KEY]."
    ),
]
WRef = Annotated[
    str | None,
    typer.Option(
        "--w", metavar="REF", help="w (*kernel,Cin/g,Cout; nchw: Cout,Cin/g,*kernel) as FILE[:KEY]."
    ),
]
BRef = Annotated[
    str | None, typer.Option("--b", metavar="REF", help="b (Cout,) or (1,1,1,Cout) as FILE[:KEY].")
]
LayerName = Annotated[
    str | None,
    typer.Option(
        "--layer",
        metavar="NAME",
        help="w and b of this layer of DATA (or of --w FILE): PyTorch NAME.weight (implies "
        "--layout nchw), Keras NAME/vars/0 or NAME/kernel:0.",
    ),
]


def _hparam_option(name: str):
    """The option for one row of the hyperparameter table (its text is parsed by the table)."""
    hparam = BY_NAME[name]
    return typer.Option(
        flag_for(name),
        metavar=hparam.metavar,
        help=f"{hparam.help} Default: file, else {hparam.default}.",
    )


def _hparam_texts(arguments: dict[str, object]) -> dict[str, str | None]:
    """The hyperparameter flags among a command's ``locals()``, by library name.

    Every command names its hyperparameter arguments by the table's keys (``pad`` for
    padding), so the table, not each command, says which arguments are hyperparameters.
    """
    texts = {row.name: arguments.get(row.key) for row in HPARAMS}
    return {  # a boolean flag (--transposed) as the table's text for it
        name: str(int(value)) if isinstance(value, bool) else cast("str | None", value)
        for name, value in texts.items()
    }


Stride = Annotated[str | None, _hparam_option("stride")]
Pad = Annotated[str | None, _hparam_option("padding")]
Dilation = Annotated[str | None, _hparam_option("dilation")]
Groups = Annotated[str | None, _hparam_option("groups")]
PaddingMode = Annotated[str | None, _hparam_option("padding_mode")]
Layout = Annotated[str | None, _hparam_option("layout")]
Transposed = Annotated[
    bool | None,
    typer.Option(
        "--transposed/--no-transposed",
        help="A transposed convolution (ConvTranspose); w is (*kernel,Cout/g,Cin), nchw "
        "(Cin,Cout/g,*kernel). Default: file, else no.",
        show_default=False,
    ),
]
OutputPadding = Annotated[str | None, _hparam_option("output_padding")]


# Choices as Typer wants them (enums), spelled out so that type checkers see their members;
# tests/test_cli.py checks that each lists exactly the library's names.
class EngineName(str, Enum):
    fast = "fast"
    reference = "reference"


class UpstreamName(str, Enum):
    z = "z"
    ones = "ones"
    random = "random"


class SignatureName(str, Enum):
    classic = "classic"
    cs231n = "cs231n"


class ModeName(str, Enum):
    auto = "auto"
    exhaustive = "exhaustive"
    sample = "sample"
    fast = "fast"


class DtypeName(str, Enum):
    float32 = "float32"
    float64 = "float64"


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
Heatmaps = Annotated[
    list[str] | None,
    typer.Option(
        "--heatmap", metavar="EXPR", help="Draw a 2-D slice, e.g. 'z[0,:,:,3]'; repeatable."
    ),
]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out", metavar="FILE", help="Write the outputs to this .npz, .h5 or .safetensors file."
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")]
Workspace = Annotated[
    str,
    typer.Option(
        "--max-workspace",
        metavar="SIZE",
        help=(
            "Scratch-memory budget, e.g. 64M or 1G. HDF5 and .npy inputs bigger than it are "
            "streamed."
        ),
    ),
]
MaxMemory = Annotated[
    str,
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Refuse work needing more memory: a size, 'auto' (80% of available) or 'none'.",
    ),
]
AllowNonfinite = Annotated[
    bool,
    typer.Option("--allow-nonfinite", help="Run even when x, w, b or dz hold NaN or Inf."),
]
AllowSparse = Annotated[
    bool,
    typer.Option(
        "--allow-sparse",
        help="Read tensors declaring over 1000x more data than their file stores (over 16 MiB).",
    ),
]
# the layer drawn by --shape (gradcheck, plan)
ShapeKernel = Annotated[
    str | None,
    typer.Option(
        "--kernel", metavar="K[,K..]", help="Kernel size (or one per axis), with --shape."
    ),
]
ShapeCout = Annotated[
    int | None,
    typer.Option("--cout", metavar="C", min=1, help="Output channels with --shape."),
]

MAX_THREADS = 1024  # more is never useful, and huge counts overflow the BLAS libraries' ints
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        metavar="N",
        min=1,
        max=MAX_THREADS,
        help="BLAS threads / parallel tiles (default: NumPy's).",
    ),
]


def _load(
    command,
    data,
    refs,
    required,
    optional,
    lazy_above=None,
    max_bytes=None,
    allow_sparse=False,
    layer=None,
    **flags,
):
    """Tensors from files, and the ConvSpec from the file's hyperparameters and the flags.

    Shapes and dtypes are checked against the spec from the headers before any data is read;
    HDF5 and .npy tensors bigger than ``lazy_above`` bytes stay on disk, to be streamed; tensors
    adding up to more than ``max_bytes`` are refused before they are read.
    """
    with _reading_notes():
        loaded = load_tensors(
            data,
            refs,
            required=required,
            optional=optional,
            lazy_above=lazy_above,
            max_bytes=max_bytes,
            allow_sparse=allow_sparse,
            check=header_check(command, flags),
            layer=layer,
        )
    if loaded.layout_note is not None and flags.get("layout") is None:
        _note(_messages(), loaded.layout_note)
    x = loaded.arrays.get("x")
    rank = None if x is None else len(x.shape) - 2
    return loaded, build_spec(loaded.hparams, flags, rank).spec


@contextlib.contextmanager
def _reading_notes():
    """Print the notices of reading files (safetensors' float16 read as float32) as notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        yield
    for caught_warning in caught:
        if not issubclass(caught_warning.category, ConvcliNotice):
            warnings.warn_explicit(
                caught_warning.message,
                caught_warning.category,
                caught_warning.filename,
                caught_warning.lineno,
            )
    for text in dict.fromkeys(str(w.message) for w in caught if w.category is ConvcliNotice):
        _note(_messages(), text)


def _messages() -> Console:
    """The stderr console for notes and 'wrote' messages (silent with --quiet)."""
    return _console(stderr=True, soft_wrap=True, quiet=_state["quiet"])


def _data_console() -> Console:
    """The stdout console for tables; piped output gets a width no number is cut at."""
    console = _console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120
    return console


def _check_slices(command, loaded, spec, out, slices, pictures) -> None:
    """Refuse bad --slice/--heatmap expressions before any work or any output file."""
    shapes = expected_shapes(command, RunInputs.from_loaded(loaded), spec, out is not None)
    first = "z" if command == "forward" else "dx"
    for expr in slices:
        check_slice(expr, shapes, first)
    for expr in pictures:
        shape = check_slice(expr, shapes, first, flag="--heatmap")
        if len(shape) != 2:
            raise UsageError(
                f"--heatmap {expr.label(first)}: needs a 2-D slice; this one has shape {shape}"
            )


def _finish(result: RunResult, slice_exprs, as_json: bool, out, heatmap_exprs=()) -> None:
    """Evaluate slices and heatmaps, print notices and the table (with pictures) or JSON."""
    arrays = result.arrays()
    first = result.outputs[0]
    slices = {expr.label(first): take(expr, arrays, first) for expr in slice_exprs}
    pictures = {expr.label(first): take(expr, arrays, first) for expr in heatmap_exprs}
    messages = _messages()
    for notice in result.notices:
        _note(messages, notice)
    if as_json:
        with _data_output():
            print(result_json(result, slices, pictures))
        return
    console = _data_console()
    with _data_output():
        print_result(console, result, slices)
        for label, value in pictures.items():
            print_heatmap(console, value, f"{label}, shape {value.shape}")
    if out is not None:
        messages.print(Text(one_line(f"wrote {', '.join(result.outputs)} to {out}")))


@contextlib.contextmanager
def _blas_threads(threads: int | None):
    """Pin NumPy's BLAS to ``threads`` threads for the command (no-op when None)."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        yield


@app.command()
def forward(
    data: Data = None,
    x: XRef = None,
    w: WRef = None,
    b: BRef = None,
    layer: LayerName = None,
    stride: Stride = None,
    pad: Pad = None,
    dilation: Dilation = None,
    groups: Groups = None,
    padding_mode: PaddingMode = None,
    layout: Layout = None,
    transposed: Transposed = None,
    output_padding: OutputPadding = None,
    engine: Engine = EngineName.fast,
    slice_: Slices = None,
    heatmap: Heatmaps = None,
    as_json: Json = False,
    out: Out = None,
    force: Force = False,
    max_workspace: Workspace = "256M",
    max_memory: MaxMemory = "auto",
    allow_nonfinite: AllowNonfinite = False,
    allow_sparse: AllowSparse = False,
    threads: Threads = None,
) -> None:
    """Compute z = conv(x, w) + b and summarise every tensor.

    Example: convcli forward sample_data/conv_example.h5 --slice 'z[3,2,1]'

    Without a clone, `convcli example sample_data` writes the files used here.
    """
    _run(
        "forward",
        data,
        {"x": x, "w": w, "b": b},
        _hparam_texts(locals()),
        layer=layer,
        engine=engine.value,
        slice_exprs=slice_,
        heatmap_exprs=heatmap,
        as_json=as_json,
        out=out,
        force=force,
        max_workspace=max_workspace,
        max_memory=max_memory,
        allow_nonfinite=allow_nonfinite,
        allow_sparse=allow_sparse,
        threads=threads,
    )


@app.command()
def backward(
    data: Data = None,
    x: XRef = None,
    w: WRef = None,
    b: BRef = None,
    layer: LayerName = None,
    dz: Annotated[
        str | None,
        typer.Option(
            "--dz", metavar="REF", help="Upstream gradient (shape of z, same layout) as FILE[:KEY]."
        ),
    ] = None,
    upstream: Annotated[
        UpstreamName,
        typer.Option("--upstream", help="dz when none is given: z (loss ½‖z‖²), ones, or random."),
    ] = UpstreamName.z,
    seed: Annotated[
        int | None,
        typer.Option("--seed", metavar="N", min=0, help="Seed for --upstream random."),
    ] = None,
    stride: Stride = None,
    pad: Pad = None,
    dilation: Dilation = None,
    groups: Groups = None,
    padding_mode: PaddingMode = None,
    layout: Layout = None,
    transposed: Transposed = None,
    output_padding: OutputPadding = None,
    engine: Engine = EngineName.fast,
    slice_: Slices = None,
    heatmap: Heatmaps = None,
    as_json: Json = False,
    out: Out = None,
    force: Force = False,
    max_workspace: Workspace = "256M",
    max_memory: MaxMemory = "auto",
    allow_nonfinite: AllowNonfinite = False,
    allow_sparse: AllowSparse = False,
    threads: Threads = None,
) -> None:
    """Compute dx, dw, db for an upstream gradient dz and summarise every tensor.

    Example: convcli backward sample_data/conv_example.npz --slice 'dw[:,:,0,1]'

    Without a clone, `convcli example sample_data` writes the files used here.
    """
    _run(
        "backward",
        data,
        {"x": x, "w": w, "b": b, "dz": dz},
        _hparam_texts(locals()),
        layer=layer,
        engine=engine.value,
        slice_exprs=slice_,
        heatmap_exprs=heatmap,
        as_json=as_json,
        out=out,
        force=force,
        max_workspace=max_workspace,
        max_memory=max_memory,
        allow_nonfinite=allow_nonfinite,
        allow_sparse=allow_sparse,
        threads=threads,
        upstream=upstream.value,
        seed=seed,
    )


def _run(
    command,
    data,
    refs,
    flags,
    *,
    slice_exprs,
    heatmap_exprs,
    as_json,
    out,
    max_workspace,
    max_memory,
    threads,
    allow_sparse=False,
    layer=None,
    upstream="z",
    seed=None,
    **options,
) -> None:
    """The shared body of forward and backward: load, check, run, render."""
    workspace = parse_size(max_workspace)
    memory = parse_memory(max_memory)
    slices = [parse_slice(expr) for expr in slice_exprs or []]
    pictures = [parse_slice(expr, flag="--heatmap") for expr in heatmap_exprs or []]
    optional = ("b",) if command == "forward" else ("b", "dz")
    loaded, spec = _load(
        command,
        data,
        refs,
        ("x", "w"),
        optional,
        lazy_above=workspace,
        max_bytes=memory,
        allow_sparse=allow_sparse,
        layer=layer,
        **flags,
    )
    _check_slices(command, loaded, spec, out, slices, pictures)
    run = run_forward if command == "forward" else run_backward
    with _blas_threads(threads), _progress(as_json, "chunks") as progress:
        result = run(
            RunInputs.from_loaded(loaded),
            spec,
            RunOptions(
                workspace=workspace,
                threads=threads,
                out=out,
                protect=tuple(loaded.sources),
                max_memory=memory,
                upstream=Upstream(upstream, seed),
                **options,
            ),
            progress,
        )
    _finish(result, slices, as_json, out, pictures)


@dataclass(frozen=True)
class _Layer:
    """A layer given by --shape, --kernel and --cout."""

    shape: list[int]
    kernel: list[int]
    cout: int


def _layer_flags(shape: str | None, kernel: str | None, cout: int | None) -> _Layer | None:
    """The layer --shape/--kernel/--cout describe (all three, or none: None)."""
    shape_ = None if shape is None else _int_list("--shape", shape, (3, 4, 5))
    kernel_ = None if kernel is None else _int_list("--kernel", kernel, (1, 2, 3))
    if shape_ is None:
        if kernel_ is not None or cout is not None:
            raise UsageError("--kernel and --cout go with --shape")
        return None
    if kernel_ is None or cout is None:
        raise UsageError("--shape needs --kernel and --cout")
    return _Layer(shape_, kernel_, cout)


def _int_list(flag: str, text: str, counts: tuple[int, ...]) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or min(values) < 1:
        wanted = " or ".join(str(c) for c in counts)
        raise UsageError(f"{flag} {text!r}: expected {wanted} comma-separated integers >= 1")
    return values


@app.command()
def gradcheck(
    data: Data = None,
    x: XRef = None,
    w: WRef = None,
    b: BRef = None,
    layer: LayerName = None,
    dz: Annotated[
        str | None,
        typer.Option("--dz", metavar="REF", help="Upstream gradient g as FILE[:KEY]."),
    ] = None,
    shape: Annotated[
        str | None,
        typer.Option(
            "--shape",
            metavar="N,H,W,CIN",
            help="Random x of this shape (N,*spatial,CIN; 1-3 axes).",
        ),
    ] = None,
    kernel: ShapeKernel = None,
    cout: ShapeCout = None,
    impl: Annotated[
        str | None,
        typer.Option(
            "--impl",
            metavar="FILE.py[:FWD[,BWD]]",
            help="Check your own conv: conv_forward/conv_backward (classic), "
            "conv_forward_naive/conv_backward_naive (cs231n), or FILE.py:FORWARD[,BACKWARD] "
            "(callable, layout from --layout).",
        ),
    ] = None,
    signature: Annotated[
        SignatureName | None,
        typer.Option("--signature", help="With --impl: the signature, instead of detecting it."),
    ] = None,
    nondet_tol: Annotated[
        float | None,
        typer.Option(
            "--nondet-tol",
            metavar="TOL",
            help="With --impl: largest difference allowed between two backward calls on the "
            "same inputs [0: bit-identical].",
        ),
    ] = None,
    mode: Annotated[
        ModeName | None, typer.Option("--mode", help="auto (default), exhaustive, sample or fast.")
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples", min=1, help=f"Elements per tensor in sample mode [{DEFAULT_SAMPLES}]."
        ),
    ] = None,
    probes: Annotated[
        int | None,
        typer.Option(
            "--probes", min=1, help=f"Random directions per tensor, fast mode [{DEFAULT_PROBES}]."
        ),
    ] = None,
    eps: Annotated[
        float, typer.Option("--eps", help="Finite-difference step (> 0).")
    ] = DEFAULT_EPS,
    rtol: Annotated[
        float, typer.Option("--rtol", help="Relative tolerance (>= 0).")
    ] = DEFAULT_RTOL,
    atol: Annotated[
        float, typer.Option("--atol", help="Absolute tolerance (>= 0).")
    ] = DEFAULT_ATOL,
    upstream: Annotated[
        UpstreamName | None,
        typer.Option(
            "--upstream",
            help="g in L = Σ z⊙g when no dz is given: z, ones or random (the default).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", metavar="N", min=0, help="Seed for inputs, g and samples.")
    ] = 0,
    stride: Stride = None,
    pad: Pad = None,
    dilation: Dilation = None,
    groups: Groups = None,
    padding_mode: PaddingMode = None,
    layout: Layout = None,
    transposed: Transposed = None,
    output_padding: OutputPadding = None,
    as_json: Json = False,
    max_memory: MaxMemory = "auto",
    allow_sparse: AllowSparse = False,
    threads: Threads = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            help="With --impl: time limit per configuration for your code [30].",
        ),
    ] = None,
) -> None:
    """Check dx, dw, db against numerical gradients; exit 1 if any element fails.

    Example: convcli gradcheck sample_data/conv_example.h5 --mode exhaustive

    Without a clone, `convcli example sample_data` writes the files used here.
    """
    tolerance = Tolerance(eps=eps, rtol=rtol, atol=atol)
    flags = _hparam_texts(locals())
    drawn = _layer_flags(shape, kernel, cout)
    memory = parse_memory(max_memory)
    from_files = bool(data or x or w or b or dz)
    if layer is not None and not from_files:
        raise UsageError("--layer picks a layer in a data file (or --w FILE): pass one")
    with_impl = {"--timeout": timeout, "--signature": signature, "--nondet-tol": nondet_tol}
    if impl is not None and (transposed or output_padding is not None):
        raise UsageError(
            "--impl checks convolutions; --transposed and --output-padding do not apply"
        )
    for flag, value in with_impl.items():
        if value is not None and impl is None:
            raise UsageError(f"{flag} goes with --impl")
    if drawn is not None and from_files:
        raise UsageError("give either a data file (or --x/--w) or --shape, not both")
    with _blas_threads(threads), _progress(as_json, "gradcheck") as progress:
        if impl is not None:
            run = _impl_check(
                impl,
                data,
                {"x": x, "w": w, "b": b, "dz": dz},
                drawn,
                flags,
                ImplFlags(
                    mode=None if mode is None else mode.value,
                    unused={
                        "--samples without --mode sample": samples is not None
                        and mode is not ModeName.sample,
                        "--probes": probes is not None,
                        "--upstream": upstream is not None,
                    },
                    signature=None if signature is None else signature.value,
                    nondet_tol=0.0 if nondet_tol is None else nondet_tol,
                    samples=samples or DEFAULT_SAMPLES,
                    seed=seed,
                    tolerance=tolerance,
                    timeout=timeout,
                    memory=memory,
                    allow_sparse=allow_sparse,
                    layer=layer,
                ),
                progress,
            )
        else:
            if drawn is not None:
                spec = build_spec({}, flags, len(drawn.shape) - 2).spec
                check_generated_memory(drawn.shape, drawn.kernel, drawn.cout, spec, memory)
                arrays, _ = generate_layer(drawn.shape, drawn.kernel, drawn.cout, spec, seed=seed)
            elif from_files:
                loaded, spec = _load(
                    "gradcheck",
                    data,
                    {"x": x, "w": w, "b": b, "dz": dz},
                    ("x", "w"),
                    ("b", "dz"),
                    max_bytes=memory,
                    allow_sparse=allow_sparse,
                    layer=layer,
                    **flags,
                )
                arrays = loaded.arrays
            else:
                raise UsageError(
                    "give a data file, --x/--w, --shape with --kernel and --cout, or --impl"
                )
            run = run_gradcheck(
                RunInputs.of(arrays),
                spec,
                upstream=Upstream((upstream or UpstreamName.random).value, seed),
                mode=(mode or ModeName.auto).value,
                samples=samples or DEFAULT_SAMPLES,
                probes=probes or DEFAULT_PROBES,
                tolerance=tolerance,
                progress=progress,
                max_memory=memory,
            )
    messages = _messages()
    for notice in run.notices:
        _note(messages, notice)
    with _data_output():
        if as_json:
            print(gradcheck_json(run))
        else:
            print_gradcheck(_data_console(), run)
    if not run.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@dataclass(frozen=True)
class ImplFlags:
    """The gradcheck flags an --impl run uses (beyond the layer and hyperparameters)."""

    mode: str | None
    unused: dict[str, bool]
    signature: str | None
    nondet_tol: float
    samples: int
    seed: int
    tolerance: Tolerance
    timeout: float | None
    memory: int | None
    allow_sparse: bool
    layer: str | None = None


def _impl_check(impl, data, refs, layer, flags, options: ImplFlags, progress) -> GradcheckRun:
    """gradcheck --impl: on the suite, on the --shape layer or on the data file's arrays."""
    unused = [name for name, given in options.unused.items() if given]
    from_files = bool(data or any(refs.values()))
    if layer is None and not from_files:
        hparams = [name for name, value in flags.items() if value is not None and name != "layout"]
        if hparams:
            unused.append("hyperparameter flags without --shape or a data file")
    if unused:
        raise UsageError(
            "--impl runs its own suite, the one configuration given by "
            "--shape/--kernel/--cout and the hyperparameter flags, or the layer in a data "
            "file; it does not use " + ", ".join(unused)
        )
    impl_layer = None
    origins: dict[str, str] = {}
    layout = build_spec({}, flags, None).spec.layout
    if layer is not None:
        spec = build_spec({}, flags, len(layer.shape) - 2).spec
        check_generated_memory(layer.shape, layer.kernel, layer.cout, spec, options.memory)
        impl_layer = ImplLayer(spec=spec, shape=layer.shape, kernel=layer.kernel, cout=layer.cout)
    elif from_files:
        loaded, spec = _load(
            "gradcheck",
            data,
            refs,
            ("x", "w"),
            ("b", "dz"),
            max_bytes=options.memory,
            allow_sparse=options.allow_sparse,
            layer=options.layer,
            **flags,
        )
        impl_layer = ImplLayer(spec=spec, inputs=RunInputs.of(loaded.arrays))
        layout = spec.layout
        x = loaded.arrays["x"]
        origins = build_spec(loaded.hparams, flags, len(x.shape) - 2).origins
    try:
        return run_impl_check(
            impl,
            seed=options.seed,
            tolerance=options.tolerance,
            progress=progress,
            timeout=options.timeout,
            max_memory=options.memory,
            signature=options.signature,
            layout=layout,
            layer=impl_layer,
            mode=options.mode or "auto",
            nondet_tol=options.nondet_tol,
            samples=options.samples,
        )
    except UsageError as error:
        # a hyperparameter the signature cannot take, read from the data file: bad data
        # from that file, not a flag the user typed
        origin = origins.get(error.param or "", "flag")
        if origin in ("flag", "default"):
            raise
        raise HyperparameterError(error.describe(f"{error.param} from {origin}")) from None


def _result_ref(name: str, shape: str):
    return typer.Option(
        f"--{name}", metavar="REF", help=f"Your {name} ({shape}) as FILE[:KEY]; wins over files."
    )


@app.command()
def compare(
    data: Data = None,
    expect: Annotated[
        str | None,
        typer.Option(
            "--expect",
            metavar="FILE",
            help="File holding your results (z/y/out, dx/dA_prev, dw/dW, db); default DATA.",
        ),
    ] = None,
    x: XRef = None,
    w: WRef = None,
    b: BRef = None,
    layer: LayerName = None,
    dz: Annotated[
        str | None,
        typer.Option(
            "--dz",
            metavar="REF",
            help="Upstream gradient for dx, dw, db (default: dz = z, the loss ½‖z‖²).",
        ),
    ] = None,
    z_ref: Annotated[str | None, _result_ref("z", "shape of z")] = None,
    dx_ref: Annotated[str | None, _result_ref("dx", "shape of x")] = None,
    dw_ref: Annotated[str | None, _result_ref("dw", "shape of w")] = None,
    db_ref: Annotated[str | None, _result_ref("db", "Cout")] = None,
    rtol: Annotated[
        float | None,
        typer.Option("--rtol", help="Relative tolerance (>= 0); default 2·eps(dtype)·sqrt(K)."),
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option("--atol", help="Absolute tolerance (>= 0); default K·tiny(dtype)."),
    ] = None,
    stride: Stride = None,
    pad: Pad = None,
    dilation: Dilation = None,
    groups: Groups = None,
    padding_mode: PaddingMode = None,
    layout: Layout = None,
    transposed: Transposed = None,
    output_padding: OutputPadding = None,
    as_json: Json = False,
    max_memory: MaxMemory = "auto",
    allow_sparse: AllowSparse = False,
    threads: Threads = None,
) -> None:
    """Compare your saved z, dx, dw, db with convcli's; name the mistake; exit 1 on a mismatch.

    Example: convcli compare layer.npz --expect yours.npz
    """
    flags = _hparam_texts(locals())
    # refuse a bad --rtol/--atol before any file is read (None: the accumulation rule's value)
    Tolerance(rtol=0 if rtol is None else rtol, atol=0 if atol is None else atol)
    memory = parse_memory(max_memory)
    loaded, spec = _load(
        "backward",  # the inputs are backward's: x, w, optional b and dz
        data,
        {"x": x, "w": w, "b": b, "dz": dz},
        ("x", "w"),
        ("b", "dz"),
        max_bytes=memory,
        allow_sparse=allow_sparse,
        layer=layer,
        **flags,
    )
    refs = {"z": z_ref, "dx": dx_ref, "dw": dw_ref, "db": db_ref}
    with _reading_notes():
        results = load_tensors(
            expect if expect is not None else data,
            refs,
            (),
            tuple(refs),
            max_bytes=memory,
            allow_sparse=allow_sparse,
        )
    with _blas_threads(threads):
        run = run_compare(
            RunInputs.from_loaded(loaded),
            {k: v for k, v in results.arrays.items() if isinstance(v, np.ndarray)},
            spec,
            origins=results.origins,
            rtol=rtol,
            atol=atol,
            max_memory=memory,
        )
    with _data_output():
        if as_json:
            print(compare_json(run))
        else:
            print_compare(_data_console(), run)
    if not run.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


@contextlib.contextmanager
def _progress(as_json: bool, label: str):
    """A progress callback that draws a bar on stderr once a task has taken half a second.

    None with --json or when stdout is not a terminal.
    """
    if as_json or _state["quiet"] or sys.stdout is None or not sys.stdout.isatty():
        yield None
        return
    from rich.progress import Progress

    bar: Progress | None = None
    task = None
    start = time.perf_counter()

    def update(done: int, total: int) -> None:
        nonlocal bar, task
        if bar is None:
            if time.perf_counter() - start < 0.5:
                return
            bar = Progress(console=_console(stderr=True), transient=True)
            bar.start()
            task = bar.add_task(label, total=total)
        if task is not None:
            bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()


@app.command()
def generate(
    out: Annotated[
        Path,
        typer.Argument(
            metavar="OUT", help="New .npz, .h5 or .safetensors file to write.", show_default=False
        ),
    ],
    shape: Annotated[
        str,
        typer.Option(
            "--shape", metavar="N,H,W,CIN", help="x as N,*spatial,CIN (1-3 spatial axes)."
        ),
    ],
    kernel: Annotated[
        str, typer.Option("--kernel", metavar="K[,K..]", help="Kernel size, or one per axis.")
    ],
    cout: Annotated[int, typer.Option("--cout", metavar="C", min=1, help="Output channels.")],
    stride: Stride = None,
    pad: Pad = None,
    dilation: Dilation = None,
    groups: Groups = None,
    padding_mode: PaddingMode = None,
    layout: Layout = None,
    transposed: Transposed = None,
    output_padding: OutputPadding = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", min=0, help="Random seed.")] = 0,
    dtype: Annotated[
        DtypeName, typer.Option("--dtype", help="float32 or float64.")
    ] = DtypeName.float64,
    with_dz: Annotated[
        bool, typer.Option("--with-dz", help="Also write an upstream gradient dz (shape of z).")
    ] = False,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Write random x, w, b (and dz) with hyperparameters to a file the other commands read.

    Example: convcli generate layer.h5 --shape 8,32,32,16 --kernel 3 --cout 32 --pad same
    """
    shape_, kernel_ = (
        _int_list("--shape", shape, (3, 4, 5)),
        _int_list("--kernel", kernel, (1, 2, 3)),
    )
    spec = build_spec(
        {},
        _hparam_texts(locals()),
        len(shape_) - 2,
    ).spec
    check_generated_memory(shape_, kernel_, cout, spec, parse_memory("auto"), dz=with_dz)
    tensors, attrs = generate_layer(
        shape_,
        kernel_,
        cout,
        spec,
        seed=seed,
        dtype=dtype.value,
        dz=with_dz,
    )
    check_disk(out, {name: t.nbytes for name, t in tensors.items()}, param="generate_out")
    write_tensors(out, tensors, attrs, force=force, param="generate_out")
    with _data_output():
        _print_generated(out, tensors, attrs, dtype.value, as_json)


def _print_generated(out, tensors, attrs, dtype: str, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                versioned(
                    {
                        "command": "generate",
                        "out": str(out),
                        "hparams": attrs,
                        "tensors": {
                            k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                            for k, v in tensors.items()
                        },
                    }
                )
            )
        )
        return
    listing = ", ".join(f"{name} {tuple(a.shape)}" for name, a in tensors.items())
    _data_console().print(
        Text(one_line(f"wrote {out}: {listing} {dtype}; hyperparameters {attrs}", 10**4)),
        soft_wrap=True,
    )


@app.command()
def example(
    folder: Annotated[
        str,
        typer.Argument(
            metavar="DIR", help="Folder to write into (made if missing).", show_default=False
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite files of the same names in DIR.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Write the classic exercise's files (what the help examples' sample_data/ holds) to DIR:
    conv_example.npz, conv_example.h5 and sweep.toml. Existing files are kept unless --force.

    Example: convcli example sample_data
    """
    if not folder:  # Path("") would be the current folder
        raise UsageError("DIR is empty: name the folder to write into (. for this one)")
    written = write_examples(Path(folder), force=force)
    with _data_output():
        if as_json:
            print(json.dumps(versioned({"command": "example", "files": list(map(str, written))})))
        else:
            listing = ", ".join(path.name for path in written)
            _data_console().print(Text(one_line(f"wrote {folder}: {listing}")), soft_wrap=True)


@app.command()
def inspect(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="A .npz, .npy, .h5 or .safetensors file.", show_default=False
        ),
    ],
    as_json: Json = False,
) -> None:
    """List every tensor in a file and the hyperparameters it holds, without reading the data.

    Example: convcli inspect sample_data/conv_example.h5

    Without a clone, `convcli example sample_data` writes the files used here.
    """
    report = inspect_file(file)
    with _data_output():
        if as_json:
            print(json.dumps(versioned(report)))
        else:
            print_inventory(_data_console(), report)


@app.command()
def plan(
    data: Data = None,
    x: XRef = None,
    w: WRef = None,
    b: BRef = None,
    layer_name: LayerName = None,
    shape: Annotated[
        str | None,
        typer.Option(
            "--shape", metavar="N,H,W,CIN", help="x as N,*spatial,CIN (1-3 axes), with --kernel."
        ),
    ] = None,
    kernel: ShapeKernel = None,
    cout: ShapeCout = None,
    stack: Annotated[
        Path | None,
        typer.Option(
            "--stack",
            metavar="FILE.toml",
            help="TOML with a layers table per layer (sweep spec keys; shape on the first only).",
        ),
    ] = None,
    stride: Stride = None,
    pad: Pad = None,
    dilation: Dilation = None,
    groups: Groups = None,
    padding_mode: PaddingMode = None,
    layout: Layout = None,
    transposed: Transposed = None,
    output_padding: OutputPadding = None,
    dtype: Annotated[
        DtypeName | None,
        typer.Option("--dtype", help="With --shape: float32 or float64 (default)."),
    ] = None,
    no_bias: Annotated[
        bool, typer.Option("--no-bias", help="With --shape: a layer without bias.")
    ] = False,
    max_workspace: Workspace = "256M",
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Shapes, padding, parameters, MACs and FLOPs, receptive field and memory of a layer,
    from flags, a data file's headers (no data is read) or a stack of layers in TOML.

    Example: convcli plan --shape 1,32,32,3 --kernel 3 --cout 16 --pad 1
    """
    texts = _hparam_texts(locals())
    sized = _layer_flags(shape, kernel, cout)
    if sized is None and (dtype is not None or no_bias):
        raise UsageError("--dtype and --no-bias go with --shape (files and stacks say their own)")
    options = {
        "workspace": parse_size(max_workspace),
        "bias": not no_bias,
        "dtype": "float64" if dtype is None else dtype.value,
    }
    given = [
        name
        for name, used in (
            ("--shape", sized is not None),
            ("--stack", stack is not None),
            ("a data file", data is not None or any((x, w, b, layer_name))),
        )
        if used
    ]
    if len(given) != 1:
        what = f"got {' and '.join(given)}" if given else "got none"
        raise UsageError(
            f"give --shape (with --kernel, --cout), --stack or a data file: one of them, {what}"
        )
    with _blas_threads(threads):  # the engine's workspace grows with its parallel tiles
        refs = {"x": x, "w": w, "b": b}
        plans, source = _plans(data, refs, sized, stack, texts, layer_name=layer_name, **options)
    with _data_output():
        if as_json:
            print(plan_json(plans, source))
        else:
            print_plan(_data_console(), plans, source)


def _plans(
    data, refs, sized, stack, texts, *, layer_name, workspace, bias, dtype
) -> tuple[StackPlan, str]:
    """The plan ``convcli plan`` prints, and where its layers came from."""
    if stack is not None:
        if any(text is not None for text in texts.values()):
            raise UsageError("with --stack, hyperparameters go in the stack file's [[layers]]")
        plans, source = plan_stack(stack, workspace=workspace), str(stack)
    elif sized is not None:
        spec = build_spec({}, texts, len(sized.shape) - 2).spec
        x_shape, w_shape = layer_shapes(sized.shape, sized.kernel, sized.cout, spec)
        single = plan_layer(x_shape, w_shape, spec, bias=bias, dtype=dtype, workspace=workspace)
        plans, source = StackPlan.of([single]), "flags"
    else:
        single = plan_file(data, refs, texts, layer=layer_name, workspace=workspace)
        given = " ".join(f"--{role} {ref}" for role, ref in refs.items() if ref is not None)
        plans, source = StackPlan.of([single]), " ".join(str(v) for v in (data, given) if v)
    return plans, source


@app.command()
def sweep(
    spec: Annotated[
        Path, typer.Argument(metavar="SPEC.toml", help="The sweep to run.", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="FILE", help="JSON Lines results (default: SPEC.jsonl)."),
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Parallel processes.")] = 1,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Skip configurations already in --out (written by this spec); run the rest.",
        ),
    ] = False,
    append: Annotated[
        bool,
        typer.Option("--append", help="Like --resume, but --out may hold results of another spec."),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Start --out over if it exists.")] = False,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            metavar="ADDRESS",
            help="Run on a Dask cluster at tcp://HOST:PORT (pip install 'convcli\\[dask]').",
        ),
    ] = None,
    max_configs: Annotated[
        int,
        typer.Option(
            "--max-configs",
            min=1,
            metavar="N",
            help="Refuse specs with more configurations (counted before any is made).",
        ),
    ] = MAX_CONFIGS,
    max_memory: MaxMemory = "auto",
    as_json: Json = False,
) -> None:
    """Run many configurations from a TOML spec; one JSON line per result; exit 1 unless
    every configuration ran and passed.

    Example: convcli sweep sample_data/sweep.toml --out results.jsonl --jobs 2

    Without a clone, `convcli example sample_data` writes the files used here.
    """
    if append and force:
        raise UsageError("--append adds to the results and --force starts them over: give one")
    plan = load_sweep(spec, max_configs=max_configs)
    if resume and force:
        raise UsageError("--resume continues a sweep and --force starts it over: give one")
    out = out if out is not None else Path(spec.with_suffix(".jsonl").name)
    options = SweepOptions(
        jobs=jobs,
        resume=resume,
        append=append,
        force=force,
        scheduler=scheduler,
        max_memory=parse_memory(max_memory),
    )
    with _progress(as_json, "sweep") as progress:
        summary = run_sweep(plan, out, options, progress=progress)
    with _data_output():
        if as_json:
            print(json.dumps(versioned(summary.to_json())))
        else:
            print_sweep(_data_console(), summary)
    if not summary.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def main() -> None:
    """Console-script entry point."""
    app()
