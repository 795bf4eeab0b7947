"""Multi-scale deformable attention: the CPU path and the Triton kernels against the grid_sample reference.

Shapes are chosen to hit every mask and branch: S and Lq not multiples of any tile (the Triton query tile is 64 in
the interpreter), one level and five levels (one of them 1x1), P = 1 and 8, heads 1 and 8, D = 32 and 64 (and 24,
not a power of two), locations inside, exactly on the edges and pixel centres, in the half-pixel border where only
some corners exist, and far outside.

Without a GPU the Triton kernels run in Triton's interpreter (one Python program at a time), so those cases keep
programs few: one or two query tiles per (batch, head) and few heads where many levels and points are asked for.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of Triton kernels: Triton picks interpreter or compiler when a kernel is defined.
    os.environ["TRITON_INTERPRET"] = "1"

import hypothesis.strategies as st  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402

import gw_kernels  # noqa: E402
from gw_kernels import ms_deform_attn, ms_deform_attn_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SWIN_SHAPES = [(60, 80), (30, 40), (15, 20), (8, 10)]
ONE_LEVEL = [(11, 13)]
FIVE_LEVELS = [(13, 17), (7, 9), (4, 5), (2, 3), (1, 1)]


# --------------------------------------------------------------------------------------------------------------
# inputs and comparison


def level_tensors(shapes, device="cpu"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)  # (L, 2) (H, W)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])  # (L,)
    return spatial_shapes, level_start_index


def make_locations(batch, queries, heads, shapes, points, generator, edges=True):
    """(N, Lq, M, L, P, 2) x, y. Mostly uniform over [-0.1, 1.1]; with ``edges`` a share of coordinates is put
    exactly on the map edges (0, 1), on pixel centres and cell borders, in the half-pixel border outside the map
    where some corners exist, exactly at the cut-off h = -1 / h = H, and far outside."""
    levels = len(shapes)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
    locations = locations * 1.2 - 0.1
    if not edges:
        return locations
    for level, (height, width) in enumerate(shapes):
        for axis, size in ((0, width), (1, height)):
            special = torch.tensor([0.0, 1.0, 0.5 / size, 1 - 0.5 / size, 1.0 / size, 0.5, -0.25 / size,
                                    1 + 0.25 / size, -0.5 / size, 1 + 0.5 / size, -3.0, 4.0], dtype=torch.float64)
            coordinate = locations[:, :, :, level, :, axis]
            pick = torch.rand(coordinate.shape, generator=generator) < 0.35
            choice = torch.randint(len(special), coordinate.shape, generator=generator)
            coordinate[pick] = special[choice[pick]]
    return locations


def make_inputs(shapes, queries, heads, channels, points, batch=1, dtype=torch.float32, seed=0, edges=True,
                device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(shapes)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, channels, generator=generator, dtype=torch.float64)
    locations = make_locations(batch, queries, heads, shapes, points, generator, edges)
    logits = torch.randn(batch, queries, heads, len(shapes) * points, generator=generator, dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, queries, heads, len(shapes), points)
    return (value.to(device=device, dtype=dtype), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device=device, dtype=dtype), weights.to(device=device, dtype=dtype))


def assert_close_by_index(actual, expected, *, rtol, atol, what):
    """Like torch.testing.assert_close, but lists the first mismatching indices with both values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual64 = actual.detach().to("cpu", torch.float64)
    expected64 = expected.detach().to("cpu", torch.float64)
    error = (actual64 - expected64).abs()
    bad = ~(error <= atol + rtol * expected64.abs())  # NaN counts as a mismatch
    if bad.any():
        indices = bad.nonzero()[:10].tolist()
        rows = "\n".join(f"  at {tuple(index)}: got {actual64[tuple(index)].item():.8g}, "
                         f"expected {expected64[tuple(index)].item():.8g}" for index in indices)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ beyond rtol={rtol} "
                             f"atol={atol} (max abs error {error.nan_to_num(float('inf')).max().item():.3g})\n{rows}")


def reference_float64(value, spatial_shapes, level_start_index, locations, weights, grad_output=None):
    """The reference in float64 on the given (possibly rounded) inputs: output and, with grad_output, gradients."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (value, locations, weights)]
    output = ms_deform_attn_reference(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    if grad_output is None:
        return output.detach()
    output.backward(grad_output.to(torch.float64))
    return output.detach(), [leaf.grad for leaf in leaves]


def run_with_grads(backend, value, spatial_shapes, level_start_index, locations, weights, grad_output):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    output = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend=backend)
    output.backward(grad_output.to(output.dtype))
    return output.detach(), [leaf.grad for leaf in leaves]


# Tolerances, float32 kernels against the float64 reference on the same inputs. Outputs are O(1) (unit-normal
# values, softmaxed weights): float32 rounding over L*P*4 terms stays under 1e-6. Location gradients scale with H
# and W (up to 17 here) times a D-term dot product, hence the looser absolute bound.
FLOAT32_OUTPUT = dict(rtol=1e-5, atol=1e-5)
FLOAT32_GRAD_VALUE = dict(rtol=1e-5, atol=1e-5)
FLOAT32_GRAD_WEIGHTS = dict(rtol=1e-5, atol=5e-5)
FLOAT32_GRAD_LOCATIONS = dict(rtol=1e-4, atol=1e-3)
FLOAT64 = dict(rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# reference


def test_reference_gradcheck_float64():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(4, 5), (2, 3), (1, 1)], queries=5, heads=2, channels=3, points=2, batch=2, dtype=torch.float64,
        edges=False)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]

    def function(value, locations, weights):
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations, weights)

    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-7)


def test_reference_matches_hand_computed_bilinear_sample():
    """One 2x2 map, one point: the output is the bilinear mix computed by hand (align_corners=False: pixel
    centres at (i + 0.5) / size)."""
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)  # row-major 2x2
    spatial_shapes, level_start_index = level_tensors([(2, 2)])
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    # x = 0.5 is between the two columns' centres; y = 0.25 is the top row's centre.
    locations = torch.tensor([0.5, 0.25], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    for backend in ("reference", "cpu"):
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=backend)
        assert output.item() == pytest.approx(1.5, abs=1e-12), backend
    # x = 0 is the map's left edge, half a pixel left of the first column's centre: only the right-hand corner
    # exists, with weight 0.5.
    locations = torch.tensor([0.0, 0.25], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    for backend in ("reference", "cpu"):
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=backend)
        assert output.item() == pytest.approx(0.5, abs=1e-12), backend


# --------------------------------------------------------------------------------------------------------------
# CPU path


CPU_CASES = [
    pytest.param(shapes, queries, heads, channels, points, batch, id=f"L{len(shapes)}-Lq{queries}-M{heads}-D{channels}"
                 f"-P{points}-N{batch}")
    for shapes, queries in ((ONE_LEVEL, 37), (FIVE_LEVELS, 53))
    for heads in (1, 8)
    for channels in (32, 64)
    for points in (1, 8)
    for batch in ((2,) if heads == 1 else (1,))
]


@pytest.mark.parametrize("shapes, queries, heads, channels, points, batch", CPU_CASES)
def test_cpu_forward_and_backward_match_reference_float32(shapes, queries, heads, channels, points, batch):
    inputs = make_inputs(shapes, queries, heads, channels, points, batch, seed=queries * heads + points)
    grad_output = torch.randn(batch, queries, heads * channels, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = reference_float64(*inputs, grad_output=grad_output)
    output, grads = run_with_grads("cpu", *inputs, grad_output)
    assert output.dtype == torch.float32
    assert_close_by_index(output, expected, **FLOAT32_OUTPUT, what="output")
    # The gradient tests use only the value and weight gradients at the exact edge locations: where h or w is
    # exactly -1 or H the official kernel (and this one) drops the sample while grid_sample keeps a corner of
    # weight 0 with a one-sided location derivative. Location gradients are checked below on generic locations.
    assert_close_by_index(grads[0], expected_grads[0], **FLOAT32_GRAD_VALUE, what="grad value")
    assert_close_by_index(grads[2], expected_grads[2], **FLOAT32_GRAD_WEIGHTS, what="grad weights")


@pytest.mark.parametrize("shapes, queries, heads, channels, points, batch", CPU_CASES[::3])
def test_cpu_location_gradients_match_reference_float32(shapes, queries, heads, channels, points, batch):
    inputs = make_inputs(shapes, queries, heads, channels, points, batch, seed=7, edges=False)
    grad_output = torch.randn(batch, queries, heads * channels, generator=torch.Generator().manual_seed(2))
    _, expected_grads = reference_float64(*inputs, grad_output=grad_output)
    _, grads = run_with_grads("cpu", *inputs, grad_output)
    assert_close_by_index(grads[1], expected_grads[1], **FLOAT32_GRAD_LOCATIONS, what="grad locations")


def test_cpu_float64_matches_reference_and_passes_gradcheck():
    inputs = make_inputs(FIVE_LEVELS[1:], queries=9, heads=3, channels=5, points=3, batch=2, dtype=torch.float64,
                         edges=False)
    grad_output = torch.randn(2, 9, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected, expected_grads = reference_float64(*inputs, grad_output=grad_output)
    output, grads = run_with_grads("cpu", *inputs, grad_output)
    assert output.dtype == torch.float64
    assert_close_by_index(output, expected, **FLOAT64, what="output")  # float64 against float64: 1e-10
    for name, grad, expected_grad in zip(("value", "locations", "weights"), grads, expected_grads):
        assert_close_by_index(grad, expected_grad, rtol=1e-9, atol=1e-9, what=f"grad {name}")

    # gradcheck calls the op twice per input element: a smaller problem.
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(3, 4), (2, 1), (1, 1)], queries=4, heads=2, channels=3, points=2, batch=1, dtype=torch.float64,
        edges=False)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

    def function(value, locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend="cpu")

    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=5),
    queries=st.integers(0, 20),
    heads=st.integers(1, 3),
    channels=st.integers(1, 9),
    points=st.integers(1, 4),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_cpu_matches_reference_on_random_shapes(shapes, queries, heads, channels, points, batch, seed):
    inputs = make_inputs(shapes, queries, heads, channels, points, batch, seed=seed)
    grad_output = torch.randn(batch, queries, heads * channels, generator=torch.Generator().manual_seed(seed))
    expected, expected_grads = reference_float64(*inputs, grad_output=grad_output)
    output, grads = run_with_grads("cpu", *inputs, grad_output)
    assert_close_by_index(output, expected, **FLOAT32_OUTPUT, what="output")
    assert_close_by_index(grads[0], expected_grads[0], **FLOAT32_GRAD_VALUE, what="grad value")
    assert_close_by_index(grads[2], expected_grads[2], **FLOAT32_GRAD_WEIGHTS, what="grad weights")


def test_cpu_does_not_read_corners_outside_the_map():
    """A NaN in value must reach only the outputs that sample it: reading an out-of-range corner with weight 0
    (a tempting branch-free shortcut) would spread it to samples on the border of the map."""
    inputs = make_inputs(FIVE_LEVELS, queries=40, heads=2, channels=4, points=3)
    value = inputs[0].clone()
    value[0, 0] = float("nan")  # first token of the first level, the top-left corner
    expected = ms_deform_attn_reference(value, *inputs[1:])
    output = ms_deform_attn(value, *inputs[1:], backend="cpu")
    assert torch.equal(output.isnan(), expected.isnan())
    assert_close_by_index(output.nan_to_num(), expected.nan_to_num(), **FLOAT32_OUTPUT, what="output")


@pytest.mark.parametrize("dtype, tolerance", [
    (torch.bfloat16, dict(rtol=1e-2, atol=1e-2)),  # computed in float32, output rounded to bfloat16 (2^-8)
    (torch.float16, dict(rtol=2e-3, atol=2e-3)),  # computed in float32, output rounded to float16 (2^-11)
])
def test_cpu_half_precision_values_are_computed_in_float32(dtype, tolerance):
    inputs = make_inputs(FIVE_LEVELS, queries=21, heads=2, channels=8, points=2, dtype=dtype)
    output = ms_deform_attn(*inputs, backend="cpu")
    assert output.dtype == dtype
    assert_close_by_index(output, reference_float64(*inputs), **tolerance, what="output")


def _forked_child_runs_the_cpu_path(inputs, expected, results):
    leaves = [t.clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
    output = ms_deform_attn(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2], backend="cpu")
    output.sum().backward()
    results.put((gw_kernels.in_forked_child(), (output.detach() - expected).abs().max().item()))


def test_cpu_path_works_in_a_forked_child():
    """A forked child used to hang in the first parallel region: GNU OpenMP's thread pool (torch's and Numba's)
    does not survive fork. Forked children now get single-threaded kernels."""
    import multiprocessing

    inputs = make_inputs(FIVE_LEVELS, queries=30, heads=2, channels=8, points=2)
    expected = ms_deform_attn(*inputs, backend="cpu")  # the parent has run the parallel kernels
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_forked_child_runs_the_cpu_path, args=(inputs, expected, results))
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, f"forked child exit code {child.exitcode} (None: hung)"
    forked, error = results.get(timeout=5)
    assert forked and error <= 1e-6


# --------------------------------------------------------------------------------------------------------------
# dispatch and errors


def test_auto_backend_picks_the_cpu_path_on_cpu(monkeypatch):
    from gw_kernels import cpu

    calls = []
    original = cpu.ms_deform_attn_forward_cpu
    monkeypatch.setattr(cpu, "ms_deform_attn_forward_cpu", lambda *args: calls.append(1) or original(*args))
    inputs = make_inputs(ONE_LEVEL, queries=3, heads=1, channels=2, points=1)
    ms_deform_attn(*inputs)
    assert calls == [1]


def test_non_contiguous_inputs_are_made_contiguous():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        FIVE_LEVELS, queries=11, heads=2, channels=6, points=2, batch=2)
    expected = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend="cpu")
    # The same numbers in transposed storage.
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    locations_t = locations.transpose(0, 1).contiguous().transpose(0, 1)
    weights_t = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    output = ms_deform_attn(value_t, spatial_shapes, level_start_index, locations_t, weights_t, backend="cpu")
    assert torch.equal(output, expected)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_batch_and_queries(backend):
    for batch, queries in ((0, 5), (2, 0)):
        inputs = make_inputs(ONE_LEVEL, queries=queries, heads=2, channels=3, points=2, batch=batch)
        leaves = [t.requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
        output = ms_deform_attn(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2], backend=backend)
        assert output.shape == (batch, queries, 6)
        output.sum().backward()
        assert all(leaf.grad is not None and leaf.grad.abs().sum() == 0 for leaf in leaves)


def _good_inputs():
    return list(make_inputs([(3, 4), (2, 2)], queries=5, heads=2, channels=3, points=2, batch=2))


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.__setitem__(0, a[0][:, :-1]), ValueError, "add up to"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"value must be \(N, S, M, D\)"),
    (lambda a: a.__setitem__(1, torch.tensor([[3, 4], [2, 3]])), ValueError, "add up to 18 tokens but value has"),
    (lambda a: a.__setitem__(1, torch.tensor([3, 4, 2, 2])), ValueError, r"spatial_shapes must be \(L, 2\)"),
    (lambda a: a.__setitem__(1, torch.tensor([[3.0, 4.0], [2.0, 2.0]])), TypeError, "integer tensor"),
    (lambda a: a.__setitem__(2, torch.tensor([0, 11])), ValueError, "running sum"),
    (lambda a: a.__setitem__(2, torch.tensor([0])), ValueError, "level_start_index must be"),
    (lambda a: a.__setitem__(3, a[3][:, :, :1]), ValueError, "sampling_locations shape"),
    (lambda a: a.__setitem__(3, a[3][..., :1]), ValueError, "sampling_locations shape"),
    (lambda a: a.__setitem__(4, a[4][:, :-1]), ValueError, "attention_weights shape"),
    (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "value must be float32"),
    (lambda a: a.__setitem__(3, a[3].to(torch.int64)), TypeError, "sampling_locations must be floating"),
    (lambda a: a.__setitem__(4, a[4].to(torch.complex64)), TypeError, "attention_weights must be floating"),
    (lambda a: a.__setitem__(4, a[4].numpy()), TypeError, "must be a torch.Tensor"),
])
def test_bad_input_gets_a_clear_error(change, error, message):
    arguments = _good_inputs()
    change(arguments)
    for backend in ("auto", "reference", "cpu", "triton"):
        with pytest.raises(error, match=message):
            ms_deform_attn(*arguments, backend=backend)


def test_bad_backend_and_triton_dtype_get_clear_errors():
    arguments = _good_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(*arguments, backend="cuda")
    arguments = [t.to(torch.float64) if t.is_floating_point() else t for t in arguments]
    with pytest.raises(TypeError, match="use backend='reference' for float64"):
        ms_deform_attn(*arguments, backend="triton")


# --------------------------------------------------------------------------------------------------------------
# Triton (interpreter without a GPU)


def _triton_available():
    from gw_kernels import triton_msda

    return torch.cuda.is_available() or triton_msda.interpreting()


triton_only = pytest.mark.skipif(not _triton_available(),
                                 reason="no GPU, and Triton kernels were defined before TRITON_INTERPRET=1 was set")

# Few programs each: programs = ceil(Lq / 64) * N * M in the interpreter, and each walks L * P samples in Python.
TRITON_CASES = [
    pytest.param(ONE_LEVEL, 100, 1, 32, 1, 2, id="L1-P1-M1-D32-two-tiles"),
    pytest.param(FIVE_LEVELS, 45, 1, 64, 8, 1, id="L5-P8-M1-D64"),
    pytest.param(SWIN_SHAPES[2:] + [(3, 5)], 30, 8, 32, 2, 1, id="L3-P2-M8-D32"),
    pytest.param([(5, 7), (3, 3)], 70, 2, 24, 3, 1, id="L2-P3-M2-D24-masked-channels"),
]


@triton_only
@pytest.mark.parametrize("shapes, queries, heads, channels, points, batch", TRITON_CASES)
def test_triton_forward_and_backward_match_reference_float32(shapes, queries, heads, channels, points, batch):
    inputs = make_inputs(shapes, queries, heads, channels, points, batch, seed=queries + heads, device=DEVICE)
    grad_output = torch.randn(batch, queries, heads * channels, generator=torch.Generator().manual_seed(4))
    grad_output = grad_output.to(DEVICE)
    expected, expected_grads = reference_float64(*inputs, grad_output=grad_output)
    output, grads = run_with_grads("triton", *inputs, grad_output)
    assert output.dtype == torch.float32
    assert_close_by_index(output, expected, **FLOAT32_OUTPUT, what="output")
    # Value and weight gradients on locations including exact edges; location gradients on the queries whose
    # samples avoid the exact cut-off h = -1 / h = H (see the CPU test).
    assert_close_by_index(grads[0], expected_grads[0], **FLOAT32_GRAD_VALUE, what="grad value")
    assert_close_by_index(grads[2], expected_grads[2], **FLOAT32_GRAD_WEIGHTS, what="grad weights")
    generic = make_inputs(shapes, queries, heads, channels, points, batch, seed=5, edges=False, device=DEVICE)
    _, expected_grads = reference_float64(*generic, grad_output=grad_output)
    _, grads = run_with_grads("triton", *generic, grad_output)
    assert_close_by_index(grads[1], expected_grads[1], **FLOAT32_GRAD_LOCATIONS, what="grad locations")


@triton_only
@pytest.mark.parametrize("dtype, tolerance, grad_tolerance", [
    # bfloat16 values and weights, float32 locations; the kernel accumulates in float32 and rounds the output
    # once (bfloat16 keeps 8 bits: relative step 2^-8 = 0.004, outputs up to ~3).
    (torch.bfloat16, dict(rtol=1e-2, atol=1e-2), dict(rtol=1e-2, atol=2e-2)),
    # float16: relative step 2^-11 = 0.0005.
    (torch.float16, dict(rtol=2e-3, atol=2e-3), dict(rtol=2e-3, atol=4e-3)),
])
def test_triton_half_precision_matches_reference(dtype, tolerance, grad_tolerance):
    shapes = [(5, 7), (3, 3), (1, 2)]
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        shapes, queries=50, heads=2, channels=32, points=2, dtype=torch.float32, seed=11, edges=False,
        device=DEVICE)
    value, weights = value.to(dtype), weights.to(dtype)  # locations stay float32
    grad_output = torch.randn(1, 50, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    expected, expected_grads = reference_float64(value, spatial_shapes, level_start_index, locations, weights,
                                                 grad_output=grad_output)
    output, grads = run_with_grads("triton", value, spatial_shapes, level_start_index, locations, weights,
                                   grad_output)
    assert output.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == torch.float32
    assert_close_by_index(output, expected, **tolerance, what="output")
    assert_close_by_index(grads[0], expected_grads[0], **grad_tolerance, what="grad value")
    assert_close_by_index(grads[2], expected_grads[2], **grad_tolerance, what="grad weights")
    # Location gradients are computed in float32 from rounded inputs; they scale with W, H (7 here).
    assert_close_by_index(grads[1], expected_grads[1], rtol=1e-3, atol=1e-3, what="grad locations")


@triton_only
def test_triton_launch_settings_use_one_fixed_config_in_the_interpreter():
    from gw_kernels import triton_msda

    if not triton_msda.interpreting():
        pytest.skip("on a GPU the launch settings are autotuned")
    kernel, grid, settings = triton_msda._launch_settings("forward", batch=2, queries=130, heads=3, channels=24)
    assert kernel is triton_msda._msda_forward_kernel
    assert grid == (3, 6) and settings["BLOCK_Q"] == 64 and settings["BLOCK_D"] == 32


_COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gw_kernels import triton_msda

assert not triton_msda.interpreting()
common = {"shapes_ptr": "*i64", "starts_ptr": "*i64", "locations_ptr": "*fp32", "value_batch_stride": "i64",
          "queries": "i32", "heads": "i32"}
cases = [
    (triton_msda._msda_forward_kernel, "bf16", {"value_ptr": "*bf16", "weights_ptr": "*bf16", "output_ptr": "*bf16"}),
    (triton_msda._msda_backward_kernel, "fp32", {"grad_output_ptr": "*fp32", "value_ptr": "*fp32",
        "weights_ptr": "*fp32", "grad_value_ptr": "*fp32", "grad_locations_ptr": "*fp32", "grad_weights_ptr": "*fp32"}),
]
constants = {"CHANNELS": 32, "LEVELS": 4, "POINTS": 4, "BLOCK_Q": 32, "BLOCK_D": 32}
for kernel, dtype, pointers in cases:
    signature = {name: (pointers | common | {k: "constexpr" for k in constants})[name] for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"], kernel
print("compiled")
"""


def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (and the other way round); compiling the kernels to
    an sm_90 cubin (no launch, no driver needed) catches GPU-only errors on a CPU machine. Also guards compile
    time: unrolled level/point loops once made a single compile take 40 s."""
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], cwd=root, env=environment,
                            capture_output=True, text=True, timeout=180)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
