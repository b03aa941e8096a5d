"""Concurrent tiles never share writable memory: the engine against the reference engine with
forced row tiles and several threads, repeated, and the ownership rule checked tile by tile.

One image is split into blocks of output rows when it does not fit the workspace; neighbouring
blocks read overlapping input rows, so their contributions to dx overlap. These tests use images
with wide rows (so NumPy releases the GIL inside each add) and tiny workspaces (so every image is
cut into many row tiles), and repeat each call: before ownership was enforced, the threaded dx
differed from the single-threaded one on most of these configurations within a few calls.
"""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from convcli import (
    ConvSpec,
    conv_backward,
    conv_backward_reference,
    conv_forward,
    conv_forward_reference,
)
from convcli.engine.fast import DEFAULT_WORKSPACE, _for_each_tile, blas_threads, scratch_bytes
from convcli.engine.tiling import Plan, deal
from convcli.errors import MemoryLimitError
from convcli.run import RunInputs, RunOptions, run_forward
from tests.strategies import depthwise_cases, nd_conv_cases, transposed_cases

REPEATS = 12
TOO_BIG_FOR_THE_LOOPS = 200_000  # elements of x; the reference engine is one Python step per output

# name -> (x shape in the layout given, w shape, spec, workspace bytes)
CASES = {
    # the report, narrowed: lost updates in about half the calls on two threads
    "issue-depthwise-wide": (
        (1, 32, 2048, 16),
        (3, 3, 1, 16),
        ConvSpec(stride=2, padding=1, groups=16),
        DEFAULT_WORKSPACE,
    ),
    "depthwise-stride2": (
        (1, 16, 512, 16),
        (3, 3, 1, 16),
        ConvSpec(stride=2, padding=1, groups=16),
        2**16,
    ),
    "dense-stride2": ((1, 16, 256, 16), (3, 3, 16, 16), ConvSpec(stride=2, padding=1), 2**18),
    "mobilenet-depthwise-stride1": (
        (1, 24, 112, 32),
        (3, 3, 1, 32),
        ConvSpec(stride=1, padding=1, groups=32),
        2**16,
    ),
    "pad-beyond-span": ((1, 16, 256, 8), (3, 3, 8, 8), ConvSpec(padding=3), 2**17),
    "reflect-stride2": (
        (1, 16, 256, 8),
        (3, 3, 8, 8),
        ConvSpec(stride=2, padding=2, padding_mode="reflect"),
        2**16,
    ),
    "replicate-dilated": (
        (1, 20, 256, 8),
        (3, 3, 8, 8),
        ConvSpec(stride=2, padding=3, dilation=2, padding_mode="replicate"),
        2**17,
    ),
    "circular-depthwise": (
        (1, 16, 256, 8),
        (5, 5, 1, 8),
        ConvSpec(padding=2, groups=8, padding_mode="circular"),
        2**16,
    ),
    "conv1d-stride3": ((2, 2048, 16), (5, 16, 16), ConvSpec(stride=3, padding=4), 2**16),
    "conv3d-stride2": ((1, 10, 12, 48, 8), (3, 3, 3, 8, 8), ConvSpec(stride=2, padding=1), 2**18),
    "conv3d-reflect-nchw": (
        (1, 8, 8, 10, 40),
        (8, 8, 3, 3, 3),
        ConvSpec(stride=(1, 2, 2), padding=1, padding_mode="reflect", layout="nchw"),
        2**17,
    ),
    "conv1d-circular": (
        (2, 1024, 8),
        (3, 8, 8),
        ConvSpec(padding=1, padding_mode="circular"),
        2**14,
    ),
    "nchw-grouped": (
        (1, 8, 16, 256),
        (8, 4, 3, 3),
        ConvSpec(stride=2, padding=2, groups=2, layout="nchw"),
        2**16,
    ),
}


def _inputs(name):
    x_shape, w_shape, spec, workspace = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    return x, w, spec, workspace


@pytest.mark.parametrize("name", sorted(CASES))
def test_threaded_row_tiles_match_reference_every_time(name):
    x, w, spec, workspace = _inputs(name)
    _, cache_ref = conv_forward(x, w, None, spec, workspace=workspace, threads=1)
    dz = np.random.default_rng(99).standard_normal(cache_ref.geometry.user_out_shape)
    dx_ref, dw_ref, _ = (
        conv_backward_reference(dz, cache_ref)
        if x.size <= TOO_BIG_FOR_THE_LOOPS
        else conv_backward(dz, cache_ref)  # one thread, itself checked on the smaller cases
    )
    for threads in (2, 3, 4):
        # one worker with the share of the workspace each of `threads` workers gets: the same tiles
        _, cache_one = conv_forward(x, w, None, spec, workspace=workspace // threads, threads=1)
        dx_one, _, _ = conv_backward(dz, cache_one)
        assert _row_tiled(cache_one), "the case must split images into row tiles"
        np.testing.assert_allclose(dx_one, dx_ref, rtol=1e-12, atol=1e-12)
        _, cache = conv_forward(x, w, None, spec, workspace=workspace, threads=threads)
        for _ in range(REPEATS):
            dx, dw, _ = conv_backward(dz, cache)
            # the order in which contributions reach each element is fixed: same bits every time
            np.testing.assert_array_equal(dx, dx_one, err_msg=f"{threads} threads")
            np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)


def _row_tiled(cache) -> bool:
    plan = Plan(cache.geometry, np.float64, cache.workspace, backward=True)
    return plan.rows_per_tile < cache.geometry.out_sizes[0]


@pytest.mark.parametrize(
    "name",
    ["dense-stride2", "reflect-stride2", "circular-depthwise", "conv1d-stride3", "conv1d-circular"],
)
def test_tiles_of_one_wave_write_disjoint_dx_rows(name, monkeypatch):
    """Ownership observed, not trusted: record the (image, row) pairs of dx that each tile's
    fold into dx changes, then check that no two tiles of one wave share any."""
    x, w, spec, workspace = _inputs(name)
    share = workspace // 4  # the tiles four workers would get, run here on one thread
    _, cache = conv_forward(x, w, None, spec, workspace=share, threads=1)
    geometry = cache.geometry
    writes = {}
    fold = Plan.add_interior

    def recording_fold(plan, padded, target, tile):
        before = target.copy()
        fold(plan, padded, target, tile)
        changed = (target != before).reshape(geometry.n, geometry.in_sizes[0], -1).any(axis=-1)
        writes[(tile.images.start, tile.rows.start)] = changed

    monkeypatch.setattr(Plan, "add_interior", recording_fold)
    dz = np.random.default_rng(5).standard_normal(geometry.user_out_shape)
    conv_backward(dz, cache)

    plan = Plan(geometry, np.float64, share, backward=True)
    waves = plan.waves()
    tiles = [(t.images.start, t.rows.start) for wave in waves for t in wave]
    assert sorted(tiles) == sorted((t.images.start, t.rows.start) for t in plan.tiles())
    assert sorted(writes) == sorted(tiles), "every tile folds its patch gradients into dx once"
    for wave in waves:
        owner = np.zeros((geometry.n, geometry.in_sizes[0]), dtype=int)
        for tile in wave:
            owner += writes[(tile.images.start, tile.rows.start)]
        assert owner.max() == 1, "two tiles of one wave write the same dx row"
    assert len(waves) > 1, "row tiles that share input rows cannot all run at once"


def test_concurrent_calls_from_user_threads_with_different_thread_counts():
    """Calls made at once from a user's own threads (each asking for a different number of
    workers) get right results, and BLAS gets its thread count back when the last one ends."""
    from concurrent.futures import ThreadPoolExecutor

    x, w, spec, workspace = _inputs("dense-stride2")
    _, cache_one = conv_forward(x, w, None, spec, workspace=workspace // 2, threads=1)
    dz = np.random.default_rng(7).standard_normal(cache_one.geometry.user_out_shape)
    dx_one = conv_backward(dz, cache_one)[0]
    before = blas_threads()

    def call(threads):
        _, cache = conv_forward(
            x, w, None, spec, workspace=workspace // 2 * threads, threads=threads
        )
        return [conv_backward(dz, cache)[0] for _ in range(4)]

    with ThreadPoolExecutor(max_workers=6) as users:
        results = list(users.map(call, [2, 3, 4, 2, 3, 4]))
    for dxs in results:
        for dx in dxs:
            np.testing.assert_array_equal(dx, dx_one)
    assert blas_threads() == before


def test_a_failing_tile_stops_the_call_only_after_every_worker_has_stopped(monkeypatch):
    """A tile that raises (MemoryError, or KeyboardInterrupt while the caller waits): the
    call raises only once no other worker runs a tile of it, so that its scratch buffers,
    given back for the next call to reuse, are no longer written (the other workers went on
    with their tiles after the call had raised), and BLAS's thread count is back."""
    from convcli.engine import fast

    submitted = []
    real_executor = fast._executor

    class Recording:
        def __init__(self, executor):
            self.executor = executor

        def submit(self, *args):
            future = self.executor.submit(*args)
            submitted.append(future)
            return future

    monkeypatch.setattr(fast, "_executor", lambda workers: Recording(real_executor(workers)))
    real_im2col = Plan.im2col

    def im2col(self, x, tile):
        if tile.images.start == 0 and tile.rows.start == 0:
            raise MemoryError("the first tile")
        return real_im2col(self, x, tile)

    monkeypatch.setattr(Plan, "im2col", im2col)
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((64, 6, 6, 3)), rng.standard_normal((3, 3, 3, 2))
    before = blas_threads()
    with pytest.raises(MemoryError, match="the first tile"):
        conv_forward(x, w, None, ConvSpec(stride=2), workspace=2000, threads=2)
    assert submitted
    assert all(future.done() for future in submitted)
    assert blas_threads() == before


@given(
    n=st.integers(1, 2),
    size=st.integers(1, 6),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    pads=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    threads=st.sampled_from([1, 2, 3]),
    rank=st.sampled_from([1, 2]),
)
def test_row_tiles_wholly_inside_the_padding_read_zeros(
    n, size, kernel, stride, pads, threads, rank
):
    """Row tiles whose receptive fields lie wholly in the zero padding (padding much wider than
    the kernel) see zeros, never what an earlier tile left in the scratch buffer."""
    assume(size + sum(pads) >= kernel)
    rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
    x = rng.standard_normal((n, size, *(3,) * (rank - 1), 2))
    w = rng.standard_normal((kernel, *(1,) * (rank - 1), 2, 3))
    spec = ConvSpec(stride=stride, padding=(pads, *((0, 0),) * (rank - 1)))
    z_ref, cache_ref = conv_forward_reference(x, w, None, spec)
    dz = rng.standard_normal(z_ref.shape)
    dx_ref, dw_ref, _ = conv_backward_reference(dz, cache_ref)
    for _ in range(2):  # the second call reuses the first call's scratch buffers
        z, cache = conv_forward(x, w, None, spec, workspace=64, threads=threads)
        np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
        dx, dw, _ = conv_backward(dz, cache)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)


def test_the_run_memory_estimate_counts_the_threads_asked_for():
    """RunOptions(threads=N) runs N tiles at once: the estimate is the engine's bound for N
    workers, not for as many as BLAS has."""
    x, w = np.zeros((16, 24, 24, 8)), np.zeros((3, 3, 8, 8))
    spec, workspace = ConvSpec(padding=1), 1 << 18
    geometry = spec.geometry(x.shape, w.shape)
    estimates = set()
    for threads in (1, 5):
        options = RunOptions(threads=threads, workspace=workspace, max_memory=1)
        with pytest.raises(MemoryLimitError) as caught:
            run_forward(RunInputs.of({"x": x, "w": w}), spec, options)
        bound = scratch_bytes(geometry, np.float64, workspace, threads)
        assert caught.value.needs["workspace"] == bound
        estimates.add(bound)
    assert len(estimates) == 2


@given(
    n=st.integers(1, 3),
    rows=st.integers(1, 9),
    cols=st.integers(1, 7),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 4)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    pads=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2), st.integers(0, 2)),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
    cout=st.integers(1, 3),
    workspace=st.sampled_from([64, 2048, DEFAULT_WORKSPACE]),
    threads=st.sampled_from([1, 2, 3]),
)
def test_shifted_kernel_rows_match_reference(
    n, rows, cols, kernel, dilation, pads, mode, cout, workspace, threads
):
    """Stride-1 layers with kw·Cin >= 3·Cout (and taps·Cin < 1024) copy only along kw and do
    one GEMM per kernel row on shifted rows of that copy: the same values as the reference,
    forced into row tiles and threads, padding modes and dilation included."""
    cin = 4
    top, bottom, left, right = pads
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    assume(rows + top + bottom >= spans[0] and cols + left + right >= spans[1])
    if mode != "zeros":  # reflect/circular padding must be narrower than the input
        assume(max(top, bottom) < rows and max(left, right) < cols)
    spec = ConvSpec(padding=((top, bottom), (left, right)), dilation=dilation, padding_mode=mode)
    rng = np.random.default_rng(rows * 10 + cols)
    x = rng.standard_normal((n, rows, cols, cin))
    w = rng.standard_normal((*kernel, cin, cout))
    b = rng.standard_normal(cout)
    geometry = spec.geometry(x.shape, w.shape)
    assume(kernel[1] * cin >= 3 * cout and (kernel != (1, 1) or any(pads)))  # not pointwise
    assert Plan(geometry, np.float64, workspace, backward=False).shifted
    z_ref, cache_ref = conv_forward_reference(x, w, b, spec)
    dz = rng.standard_normal(z_ref.shape)
    dx_ref, dw_ref, _ = conv_backward_reference(dz, cache_ref)
    for _ in range(2):  # the second call reuses the first call's scratch
        z, cache = conv_forward(x, w, b, spec, workspace=workspace, threads=threads)
        np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
        dx, dw, _ = conv_backward(dz, cache)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "spec"),
    [
        ((2, 20, 18, 8), (3, 3, 8, 8), ConvSpec(padding=1)),  # shifted kernel rows
        ((2, 20, 18, 8), (7, 7, 8, 4), ConvSpec(padding=3, padding_mode="reflect")),
        ((1, 6, 7, 8, 8), (3, 3, 3, 8, 8), ConvSpec(padding=1)),  # 3-D, shifted
        ((2, 20, 18, 4), (3, 3, 4, 16), ConvSpec(padding=1)),  # im2col (kw·Cin < 3·Cout)
        ((2, 20, 18, 8), (3, 3, 8, 8), ConvSpec(stride=2, padding=1)),  # im2col
        ((2, 20, 18, 8), (3, 3, 1, 8), ConvSpec(padding=1, groups=8)),  # depthwise, dx as conv
        ((2, 20, 18, 8), (3, 3, 1, 8), ConvSpec(stride=2, padding=1, groups=8)),  # dx by phase
        ((2, 20, 18, 4), (3, 3, 1, 8), ConvSpec(stride=2, padding=1, groups=4)),  # scatter, m=2
        ((2, 20, 18, 4), (3, 3, 1, 4), ConvSpec(padding=1, groups=4, padding_mode="reflect")),
        ((3, 5, 5, 4), (1, 1, 2, 4), ConvSpec(stride=(3, 2), groups=2)),  # dx buffer > dcols
        ((2, 9, 4), (2, 4, 4), ConvSpec(stride=3)),  # 1-D, stride above the kernel
    ],
)
@pytest.mark.parametrize("workspace", [1500, 20_000, DEFAULT_WORKSPACE])
@pytest.mark.parametrize("threads", [1, 2])
def test_real_scratch_stays_under_the_bound(
    monkeypatch, x_shape, w_shape, spec, workspace, threads
):
    """The scratch each worker's plan asks for, times the workers, is no more than
    scratch_bytes says (the memory estimates rely on it), forward and backward."""
    needs: dict[int, dict[str, int]] = {}
    original = Plan.buffer

    alive: list[Plan] = []  # kept, so that no later plan reuses an earlier one's id

    def counting(self, name, shape):
        alive.append(self)
        sizes = needs.setdefault(id(self), {})
        sizes[name] = max(sizes.get(name, 0), int(np.prod(shape)) * self.dtype.itemsize)
        return original(self, name, shape)

    monkeypatch.setattr(Plan, "buffer", counting)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    bound = scratch_bytes(spec.geometry(x.shape, w.shape), np.float64, workspace, threads)
    z, cache = conv_forward(x, w, None, spec, workspace=workspace, threads=threads)
    conv_backward(z, cache)
    assert needs
    worst = max(sum(sizes.values()) for sizes in needs.values())
    assert worst * threads <= bound, (worst, threads, bound)


@given(
    case=st.one_of(nd_conv_cases(), transposed_cases(), depthwise_cases()),
    workspace=st.sampled_from([1, 3000, DEFAULT_WORKSPACE]),
    threads=st.sampled_from([1, 2, 3]),
)
def test_real_scratch_stays_under_the_bound_for_any_layer(case, workspace, threads):
    """The scratch-bound check above on random layers of every rank, layout, padding mode,
    transposed and depthwise (found the dx buffer of unpadded strided layers uncounted)."""
    x, w, b, spec = case
    needs: dict[int, dict[str, int]] = {}
    alive: list[Plan] = []
    original = Plan.buffer

    def counting(self, name, shape):
        alive.append(self)
        sizes = needs.setdefault(id(self), {})
        sizes[name] = max(sizes.get(name, 0), int(np.prod(shape)) * self.dtype.itemsize)
        return original(self, name, shape)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Plan, "buffer", counting)
        z, cache = conv_forward(x, w, b, spec, workspace=workspace, threads=threads)
        conv_backward(z, cache)
    bound = scratch_bytes(cache.geometry, cache.dtype, workspace, threads)
    worst = max((sum(sizes.values()) for sizes in needs.values()), default=0)
    assert worst * threads <= bound, (worst, threads, bound)


@pytest.mark.parametrize("threads", [1, 2])
def test_depthwise_merged_rows_stay_under_the_bound_with_a_long_kernel(threads):
    """A 1-D depthwise layer with a long kernel and few channels: the merged-row weights and
    dw sums (kernel taps times a block of the row) are bounded and counted by scratch_bytes
    (they were taps x 4096 values each, 13 MB here, against a bound of under 1 MB)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((16, 1200, 2)), rng.standard_normal((401, 1, 2))
    spec = ConvSpec(groups=2, padding=200)
    workspace = 2**20
    bound = scratch_bytes(spec.geometry(x.shape, w.shape), np.float64, workspace, threads)
    tracemalloc.start()
    try:
        z, cache = conv_forward(x, w, None, spec, workspace=workspace, threads=threads)
        forward = tracemalloc.get_traced_memory()[1] - z.nbytes
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        dx, dw, _ = conv_backward(z, cache)
        backward = tracemalloc.get_traced_memory()[1] - start - dx.nbytes - dw.nbytes
    finally:
        tracemalloc.stop()
    slack = 2**16  # small temporaries (index arrays, einsum's own buffers)
    assert forward <= bound + slack, (forward, bound)
    assert backward <= bound + slack, (backward, bound)


# -- how tiles are cut and dealt to the workers -------------------------------------------------


def _loads(plan: Plan, workers: int) -> list[int]:
    """Output rows (over all images) each worker computes, the tiles dealt as the engine does."""
    return [
        sum(tile.n_images * tile.n_rows for tile in share)
        for wave in plan.waves()
        for share in deal(wave, workers)
    ]


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [5, 7, 32])
def test_whole_image_tiles_are_dealt_evenly(workers, n):
    """cifar's layer: six images fill a tile; each worker gets the same number of images, to
    one, and no tile is larger than the plan's scratch model allows."""
    geometry = ConvSpec(padding=1).geometry((n, 32, 32, 16), (3, 3, 16, 32))
    share = DEFAULT_WORKSPACE // workers
    plan = Plan(geometry, np.float32, share, backward=False, workers=workers)
    tiles = list(plan.tiles())
    starts = [tile.images.start for tile in tiles]
    assert starts == sorted(starts)
    assert starts[0] == 0
    assert [t.images.stop for t in tiles[:-1]] == starts[1:]
    assert tiles[-1].images.stop == n
    assert max(t.n_images for t in tiles) == plan.images_per_tile
    images = [load // geometry.out_sizes[0] for load in _loads(plan, workers)]
    assert sum(images) == n
    assert max(images) - min(images) <= 1, images


@pytest.mark.parametrize("backward", [False, True])
def test_row_blocks_of_one_image_are_equal_to_one_row(backward):
    """56 output rows that fit 5 at a time are cut 12 blocks of 4 or 5 rows (not eleven of 5
    and one of 1)."""
    geometry = ConvSpec(padding=1).geometry((2, 56, 56, 64), (3, 3, 64, 64))
    plan = Plan(geometry, np.float32, 2_750_000 if backward else 1_500_000, backward=backward)
    assert plan.rows_per_tile < 56, "the case must be cut into row tiles"
    rows = [tile.n_rows for tile in plan.tiles()]
    assert max(rows) - min(rows) <= 1, rows
    assert max(rows) == plan.rows_per_tile


@pytest.mark.parametrize("workers", [2, 3])
def test_one_image_forward_is_split_between_the_workers(workers):
    """A batch of one image that fits one tile still keeps every worker busy going forward."""
    geometry = ConvSpec(padding=1).geometry((1, 64, 64, 16), (3, 3, 16, 16))
    plan = Plan(geometry, np.float32, DEFAULT_WORKSPACE // workers, backward=False, workers=workers)
    loads = _loads(plan, workers)
    assert min(loads) > 0, loads
    assert max(loads) - min(loads) <= 1, loads


def test_one_worker_runs_blas_on_one_thread():
    """threads=1 means one core: BLAS is not left multi-threaded inside small tiles."""
    if blas_threads() < 2:
        pytest.skip("BLAS runs one thread here already")
    geometry = ConvSpec(padding=1).geometry((4, 16, 16, 8), (3, 3, 8, 8))
    seen: list[int] = []
    _for_each_tile(
        geometry,
        np.float64,
        DEFAULT_WORKSPACE,
        1,
        backward=False,
        work=lambda plan, tile: seen.append(blas_threads()),
    )
    assert seen
    assert set(seen) == {1}
    assert blas_threads() >= 2, "BLAS gets its threads back"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pointwise_layers_are_one_gemm_without_tiles(monkeypatch, threads, dtype):
    """A 1x1 stride-1 unpadded one-group layer is a matrix product of x as it lies in memory:
    forward, dx and dw are one GEMM each, no tiles, no scratch."""
    import convcli.engine.fast as fast

    def no_tiles(*args, **kwargs):
        raise AssertionError("a pointwise layer went through the tiles")

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 7, 6)).astype(dtype)
    w = rng.standard_normal((1, 1, 6, 4)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    z_ref, cache_ref = conv_forward_reference(x, w, b, ConvSpec())
    dz = rng.standard_normal(z_ref.shape).astype(dtype)
    dx_ref, dw_ref, db_ref = conv_backward_reference(dz, cache_ref)
    monkeypatch.setattr(fast, "_for_each_tile", no_tiles)
    z, cache = conv_forward(x, w, b, ConvSpec(), threads=threads)
    dx, dw, db = conv_backward(dz, cache)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert z.dtype == dx.dtype == dw.dtype == dtype
    for got, want in ((z, z_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "2"])
def test_threads_must_be_a_positive_int_or_none(bad):
    """A bad thread count is refused with the parameter's name (it was taken as 1)."""
    from convcli.errors import UsageError

    x, w = np.ones((1, 4, 4, 2)), np.ones((3, 3, 2, 2))
    with pytest.raises(UsageError) as caught:
        conv_forward(x, w, None, ConvSpec(), threads=bad)
    assert caught.value.param == "threads"
