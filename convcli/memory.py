"""Memory estimates and the guard run before any work.

:func:`check_memory` refuses work whose estimated bytes exceed the caller's ``max_memory``
with a :class:`~convcli.errors.MemoryLimitError` that lists what needs the memory; the
default budget (:func:`parse_memory` of ``"auto"``) is a fraction of what this process may
still allocate (:func:`memory_room`): the least of the system's available memory, the room
left under the address-space limit (``RLIMIT_AS``) and the room left under the cgroup's
memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``). :func:`check_disk` refuses
an output bigger than the free space of its folder.

:func:`in_memory_run_needs`, :func:`streamed_run_needs` and :func:`gradcheck_needs` are the
estimates of a forward or backward run and of a gradient check; :func:`chunk_images` sizes
the blocks a streamed run reads. The engine's own scratch estimate lives with its tiling
(:func:`convcli.engine.scratch_bytes`); sizes as text are in :mod:`convcli.units`.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convcli.errors import MemoryLimitError, OutputError
from convcli.spec import Geometry
from convcli.units import format_size, parse_size

MEMORY_FRACTION = 0.8


class MemoryBudget(int):
    """A ``max_memory`` in bytes that knows where it came from (``origin``, for messages).

    An ``int`` everywhere else: it is passed through the layers like the plain sizes the
    caller may give instead.
    """

    origin: str

    def __new__(cls, value: int, origin: str = "") -> MemoryBudget:
        budget = super().__new__(cls, value)
        budget.origin = origin
        return budget


@dataclass(frozen=True)
class MemoryRoom:
    """What this process may still allocate, by what limits it (bytes, None: no such limit).

    Attributes
    ----------
    available : the system's available memory (Linux ``MemAvailable``).
    address_space : the address-space limit (``RLIMIT_AS``) minus what the process maps now.
    cgroup : the least, over the process's cgroup and its ancestors, of the memory limit
        minus the memory in use.
    """

    available: int | None = None
    address_space: int | None = None
    cgroup: int | None = None

    def least(self) -> tuple[int, str] | None:
        """The smallest figure and what it is, e.g. ``(2**30, "1 GiB left under the
        address-space limit")``; None when no figure is known."""
        figures = [
            (value, text.format(size=format_size(value)))
            for value, text in (
                (self.address_space, "{size} left under the address-space limit"),
                (self.cgroup, "{size} left under the cgroup memory limit"),
                (self.available, "{size} of available memory"),
            )
            if value is not None
        ]
        return min(figures, key=lambda item: item[0]) if figures else None


def check_memory(needs: Mapping[str, int], max_memory: int | None) -> None:
    """Refuse when the estimated total of ``needs`` (name -> bytes) exceeds ``max_memory``.

    ``max_memory=None`` means no limit.
    """
    if max_memory is None:
        return
    total = sum(needs.values())
    if total > max_memory:
        parts = ", ".join(f"{name} {format_size(size)}" for name, size in needs.items() if size)
        origin = getattr(max_memory, "origin", None)
        raise MemoryLimitError(
            f"this needs about {format_size(total)} ({parts}), more than {{param}} "
            f"{format_size(max_memory)}" + (f" ({origin})" if origin else ""),
            needs=dict(needs),
            limit=max_memory,
        )


def nbytes(shape: Iterable[int], dtype: np.dtype | type) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (Python ints: no overflow)."""
    count = 1
    for size in shape:
        count *= int(size)
    return count * np.dtype(dtype).itemsize


def in_memory_run_needs(
    geometry: Geometry, dtype: np.dtype, *, input_bytes: int, scratch: int, backward: bool
) -> dict[str, int]:
    """What a run with every tensor in memory needs, by kind (name -> bytes).

    Parameters
    ----------
    geometry : Geometry
        The convolution's shapes.
    dtype : numpy.dtype
        The dtype the engine computes in (float32 or float64).
    input_bytes : int
        Bytes of the tensors given (x, w, b, dz), as they are held.
    scratch : int
        The engine's scratch estimate (:func:`convcli.engine.scratch_bytes`).
    backward : bool
        Also dz (when made from z), dx and dw.

    A transposed convolution whose output_padding reaches the stride runs on x extended with
    zeros to its adjoint's output sizes: that copy is ``"copy of x"``.
    """
    z = nbytes(geometry.out_shape, dtype)
    needs = {
        "inputs": input_bytes,
        "outputs": z * (2 if backward else 1),  # z, and dz when it is made
        "workspace": scratch,
    }
    if _extended_x(geometry):
        needs["copy of x"] = _extended_x(geometry) * np.dtype(dtype).itemsize
    if backward:
        shapes = geometry.user_shapes()
        needs["gradients"] = nbytes(shapes["x"], dtype) + nbytes(shapes["w"], dtype)
    return needs


def streamed_run_needs(*, weight_bytes: int, workspace: int, block_bytes: int) -> dict[str, int]:
    """What a streamed run needs: w and b (and their gradients), the blocks and the engine.

    The blocks of the batch take half of ``workspace`` (see :func:`chunk_images`) and the
    engine's scratch the other half, whatever the batch size — unless a single image's
    block (``block_bytes``, see :func:`block_bytes`) is bigger than that half: a block holds
    at least one image, so it is counted as it is.
    """
    engine = max(1, workspace - workspace // 2)
    return {
        "weights": 2 * weight_bytes,
        "blocks": max(workspace // 2, block_bytes),
        "workspace": engine,
    }


def gradcheck_needs(geometry: Geometry, *, input_bytes: int, scratch: int) -> dict[str, int]:
    """What a gradient check of convcli's engine needs, by kind (name -> bytes).

    Everything is float64. Besides the tensors as given (``input_bytes``), a check holds
    about eight arrays the size of x and w (float64 and channels-last copies, the two
    perturbed operands of a pass, analytic and numerical gradients, their errors) and six
    the size of z (z, g, the two perturbed outputs, their difference, the forward inside
    the analytic backward); ``scratch`` is the engine's workspace. A transposed layer whose
    output_padding reaches the stride adds its zero-extended copy of x (``"copy of x"``).
    """
    shapes = geometry.user_shapes()
    operands = nbytes(shapes["x"], np.float64) + nbytes(shapes["w"], np.float64)
    needs = {
        "inputs": input_bytes,
        "copies of x and w": 8 * operands,
        "copies of z": 6 * nbytes(geometry.out_shape, np.float64),
        "workspace": scratch,
    }
    if _extended_x(geometry):  # a transposed layer's zero-extended x, one pass at a time
        needs["copy of x"] = _extended_x(geometry) * 8
    return needs


def check_disk(path: str | os.PathLike[str], needs: Mapping[str, int], param: str = "out") -> None:
    """Refuse an output whose estimated size (``needs``, name -> bytes) exceeds the space
    free to this user in the folder it goes to (``os.statvfs``; unknown: no check).

    Raises
    ------
    OutputError
        For ``param``, naming the estimate and the free space (exit 73).
    """
    folder = Path(path).absolute().parent
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return
    free = stats.f_bavail * stats.f_frsize
    total = sum(needs.values())
    if total > free:
        parts = ", ".join(f"{name} {format_size(size)}" for name, size in needs.items() if size)
        raise OutputError(
            f"{{param}} {path}: the output needs about {format_size(total)} ({parts}), "
            f"more than the {format_size(free)} free in {folder}",
            param=param,
        )


def _image_bytes(geometry: Geometry, dtype: np.dtype | type, backward: bool) -> int:
    """Bytes one image takes in a block: x as read and as converted, and z; ``backward``
    adds dz (read and converted) and dx; a transposed layer may add x zero-extended."""
    x_elems = math.prod(geometry.in_sizes) * geometry.cin
    z_elems = math.prod(geometry.out_sizes) * geometry.cout
    per_image = 2 * x_elems + z_elems + (2 * z_elems + x_elems if backward else 0)
    per_image += _extended_x(geometry) // max(geometry.n, 1)
    return max(1, per_image * np.dtype(dtype).itemsize)


def _extended_x(geometry: Geometry) -> int:
    """Elements of the zero-extended copy of x a transposed convolution runs on when its
    output_padding reaches the stride (its adjoint's output is longer than x); else 0."""
    if not geometry.transposed:
        return 0
    extended = geometry.adjoint().out_sizes
    if extended == geometry.in_sizes:
        return 0
    return geometry.n * math.prod(extended) * geometry.cin


def chunk_images(geometry: Geometry, dtype: np.dtype | type, workspace: int, backward: bool) -> int:
    """Images per block of a streamed run, so that a block's arrays take at most half the
    workspace (at least one image, at most the batch; see :func:`block_bytes`)."""
    per_image = _image_bytes(geometry, dtype, backward)
    return max(1, min(geometry.n, (workspace // 2) // per_image))


def block_bytes(geometry: Geometry, dtype: np.dtype | type, images: int, backward: bool) -> int:
    """Bytes of a block of ``images`` images: x as read and as converted, and z;
    ``backward`` adds dz (read and converted) and dx."""
    return images * _image_bytes(geometry, dtype, backward)


# -- what the process may still allocate ----------------------------------------------------


def memory_room() -> MemoryRoom:
    """What this process may allocate now: available memory, and the room under its
    address-space and cgroup limits (each None where unknown or unlimited; Linux)."""
    return MemoryRoom(
        available=_available_memory(), address_space=_address_space_room(), cgroup=_cgroup_room()
    )


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations now (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_room() -> int | None:
    """``RLIMIT_AS`` (the soft limit) minus the address space mapped now; None if unlimited.

    Every allocation counts against it in full, touched or not, so it is a hard ceiling.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        mapped = 0
    return max(0, soft - mapped)


# (limit file, usage file) of cgroup v2 and v1
_CGROUP_FILES = (
    ("memory.max", "memory.current"),
    ("memory.limit_in_bytes", "memory.usage_in_bytes"),
)


def _cgroup_room() -> int | None:
    """The least ``limit - usage`` over this process's memory cgroup and its ancestors (v2
    or v1, found through ``/proc/self/cgroup`` and ``/proc/self/mountinfo``); None when
    there is no limit or no cgroup file system."""
    rooms = [
        room
        for folder in _cgroup_folders()
        for room in (_cgroup_folder_room(folder),)
        if room is not None
    ]
    return min(rooms) if rooms else None


def _cgroup_folders() -> list[Path]:
    """The folders of this process's memory cgroup and of its ancestors, where mounted."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as file:
            lines = file.read().splitlines()
        with open("/proc/self/mountinfo", encoding="utf-8") as file:
            mounts = file.read().splitlines()
    except OSError:
        return []
    paths = {}  # "v2" or "v1" -> the cgroup path
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths["v2"] = parts[2]
        elif "memory" in parts[1].split(","):
            paths["v1"] = parts[2]
    folders = []
    for mount in mounts:
        fields = mount.split(" - ", 1)
        if len(fields) != 2:
            continue
        before, after = fields[0].split(), fields[1].split()
        if len(before) < 5 or len(after) < 3:
            continue
        root, point, kind = before[3], before[4], after[0]
        version = "v2" if kind == "cgroup2" else "v1" if "memory" in after[2].split(",") else None
        if kind not in ("cgroup", "cgroup2") or version not in paths:
            continue
        relative = Path(paths[version]).relative_to("/")
        if root != "/" and paths[version].startswith(root):
            relative = Path(paths[version]).relative_to(root)
        folder = Path(point) / relative
        while True:
            folders.append(folder)
            if folder == Path(point) or folder.parent == folder:
                break
            folder = folder.parent
    return folders


def _cgroup_folder_room(folder: Path) -> int | None:
    """``limit - usage`` in one cgroup folder (v2 or v1 files), None without a limit."""
    for limit_name, usage_name in _CGROUP_FILES:
        try:
            limit_text = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max":
            return None
        try:
            limit = int(limit_text)
        except ValueError:
            return None
        if limit >= 2**62:  # v1 writes "no limit" as a huge page-rounded number
            return None
        return max(0, limit - usage)
    return None


def default_max_memory() -> MemoryBudget | None:
    """The memory guard when no ``max_memory`` is given: 80 % of :func:`memory_room`'s least
    figure (None when nothing is known)."""
    least = memory_room().least()
    if least is None:
        return None
    room, name = least
    return MemoryBudget(int(room * MEMORY_FRACTION), f"auto: {MEMORY_FRACTION:.0%} of {name}")


def parse_memory(text: str) -> int | None:
    """A ``max_memory`` text: ``auto`` (:func:`default_max_memory`), ``none``, or a size."""
    lowered = text.strip().lower()
    if lowered == "auto":
        return default_max_memory()
    if lowered in ("none", "unlimited"):
        return None
    return parse_size(text, "max_memory")
