"""The compiled IoU kernel and matcher against plain NumPy and SciPy."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from tracker.matching import iou_matrix, match_iou, match_weights

coordinate = st.floats(min_value=-50.0, max_value=250.0, allow_nan=False, allow_infinity=False, width=64)


def boxes_strategy(max_count: int):
    """Valid xyxy boxes (x2 >= x1, y2 >= y1, zero-area allowed), built from two corners."""
    return st.integers(0, max_count).flatmap(
        lambda n: arrays(np.float64, (n, 4), elements=coordinate).map(
            lambda a: np.concatenate([np.minimum(a[:, :2], a[:, 2:]), np.maximum(a[:, :2], a[:, 2:])], axis=1)
        )
    )


def numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    width = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(0)
    height = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(0)
    intersection = width * height
    union = area_a[:, None] + area_b[None, :] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


@settings(max_examples=200, deadline=None)
@given(boxes_strategy(12), boxes_strategy(12))
def test_iou_kernel_matches_numpy(a, b):
    got = iou_matrix(a, b)
    expected = numpy_iou(a, b)
    assert got.shape == (a.shape[0], b.shape[0])
    # float64 on both sides, same formula up to operation order: a few ulps.
    mismatch = np.argwhere(~np.isclose(got, expected, rtol=1e-12, atol=1e-12))
    assert mismatch.size == 0, f"IoU mismatch at {mismatch[:5].tolist()}: {got[tuple(mismatch[0])]} vs " \
                               f"{expected[tuple(mismatch[0])]}"
    assert ((got >= 0) & (got <= 1 + 1e-12)).all()


def scipy_best_total(weights: np.ndarray, min_weight: float) -> float:
    admissible = np.where(weights >= min_weight, weights, 0.0)
    rows, cols = linear_sum_assignment(admissible, maximize=True)
    return float(admissible[rows, cols].sum())


@st.composite
def weight_matrices(draw):
    rows = draw(st.integers(0, 9))
    cols = draw(st.integers(0, 9))
    # Sparse, quantised weights: many ties and many small components, the hard cases for the shortcut paths.
    values = draw(arrays(np.float64, (rows, cols), elements=st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0]))
                  )
    return values


@settings(max_examples=300, deadline=None)
@given(weight_matrices(), st.sampled_from([0.2, 0.3, 0.5]))
def test_matching_is_optimal_and_one_to_one(weights, min_weight):
    col_for_row = match_weights(weights, min_weight)
    matched_rows = np.flatnonzero(col_for_row >= 0)
    matched_cols = col_for_row[matched_rows]
    assert np.unique(matched_cols).size == matched_cols.size, "a detection was given to two tracks"
    assert (weights[matched_rows, matched_cols] >= min_weight).all(), "a pair below the threshold was matched"
    total = float(weights[matched_rows, matched_cols].sum())
    assert abs(total - scipy_best_total(weights, min_weight)) < 1e-9


def test_matching_dense_random_against_scipy():
    rng = np.random.default_rng(1)
    for size in (1, 5, 40, 120):
        for _ in range(5):
            weights = rng.uniform(0, 1, (size, size + 3)) * (rng.uniform(0, 1, (size, size + 3)) < 0.3)
            col_for_row = match_weights(weights, 0.2)
            rows = np.flatnonzero(col_for_row >= 0)
            total = weights[rows, col_for_row[rows]].sum()
            assert abs(total - scipy_best_total(weights, 0.2)) < 1e-9
            transposed = match_weights(weights.T.copy(), 0.2)
            rows_t = np.flatnonzero(transposed >= 0)
            assert abs(weights.T[rows_t, transposed[rows_t]].sum() - total) < 1e-9


def test_match_iou_end_to_end():
    tracks = np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [100.0, 100.0, 110.0, 110.0]])
    detections = np.array([[21.0, 21.0, 31.0, 31.0], [1.0, 0.0, 11.0, 10.0]])
    assert match_iou(tracks, detections, 0.3).tolist() == [1, 0, -1]
