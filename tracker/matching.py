"""IoU and optimal one-to-one matching, compiled with Numba.

Everything here is `njit(cache=True)` so that a restarted daemon loads machine code from the on-disk cache
instead of compiling again. The public entry points are also callable from plain Python with NumPy arrays.

Matching problem solved by `match_iou`: given an IoU matrix between tracks (rows) and detections (columns),
choose pairs, each row and column used at most once, every pair with IoU >= `min_iou`, maximising the sum of
IoU over chosen pairs. Pairs below `min_iou` simply do not exist (weight 0), which is what
`scipy.optimize.linear_sum_assignment(weights, maximize=True)` followed by dropping the zero-weight pairs
computes, and what `tests/test_tracker_matching.py` checks against.

Speed comes from the structure of the problem rather than from a clever solver: in real scenes most tracks
overlap exactly one detection, so the bipartite graph of admissible pairs falls apart into many tiny connected
components. Single-edge components are matched directly; only the rest go through the shortest augmenting path
(Jonker-Volgenant / Crouse) solver below, on their own small dense block.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def iou_matrix(boxes_a_xyxy: np.ndarray, boxes_b_xyxy: np.ndarray) -> np.ndarray:
    """IoU of every box in `boxes_a_xyxy` (A, 4) with every box in `boxes_b_xyxy` (B, 4) -> (A, B) float64.

    Boxes are xyxy; a pair whose union is not positive (two degenerate boxes) has IoU 0, never NaN.
    """
    count_a = boxes_a_xyxy.shape[0]
    count_b = boxes_b_xyxy.shape[0]
    out = np.zeros((count_a, count_b), dtype=np.float64)
    for i in range(count_a):
        ax1 = boxes_a_xyxy[i, 0]
        ay1 = boxes_a_xyxy[i, 1]
        ax2 = boxes_a_xyxy[i, 2]
        ay2 = boxes_a_xyxy[i, 3]
        area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
        for j in range(count_b):
            bx1 = boxes_b_xyxy[j, 0]
            by1 = boxes_b_xyxy[j, 1]
            bx2 = boxes_b_xyxy[j, 2]
            by2 = boxes_b_xyxy[j, 3]
            inter_w = min(ax2, bx2) - max(ax1, bx1)
            if inter_w <= 0.0:
                continue
            inter_h = min(ay2, by2) - max(ay1, by1)
            if inter_h <= 0.0:
                continue
            intersection = inter_w * inter_h
            union = area_a + max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0) - intersection
            if union > 0.0:
                out[i, j] = intersection / union
    return out


@njit(cache=True, nogil=True)
def _solve_dense_min_cost(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment for a dense (R, C) cost matrix with R <= C; returns column per row (R,).

    Shortest augmenting path with dual potentials (Jonker-Volgenant as described by Crouse, 2016): one
    Dijkstra-like search per row, O(R^2 C). All costs must be finite.
    """
    rows, cols = cost.shape
    potential_row = np.zeros(rows)
    potential_col = np.zeros(cols)
    shortest = np.empty(cols)
    path = np.full(cols, -1, dtype=np.int64)
    col_for_row = np.full(rows, -1, dtype=np.int64)
    row_for_col = np.full(cols, -1, dtype=np.int64)
    remaining = np.empty(cols, dtype=np.int64)
    visited_row = np.zeros(rows, dtype=np.bool_)
    visited_col = np.zeros(cols, dtype=np.bool_)

    for current_row in range(rows):
        for j in range(cols):
            remaining[j] = cols - 1 - j
            shortest[j] = np.inf
            visited_col[j] = False
        for i in range(rows):
            visited_row[i] = False
        remaining_count = cols
        min_value = 0.0
        i = current_row
        sink = -1
        while sink == -1:
            best_index = -1
            lowest = np.inf
            visited_row[i] = True
            for it in range(remaining_count):
                j = remaining[it]
                reduced = min_value + cost[i, j] - potential_row[i] - potential_col[j]
                if reduced < shortest[j]:
                    path[j] = i
                    shortest[j] = reduced
                # Prefer a free column on ties: it ends the search sooner.
                if shortest[j] < lowest or (shortest[j] == lowest and row_for_col[j] == -1):
                    lowest = shortest[j]
                    best_index = it
            min_value = lowest
            j = remaining[best_index]
            if row_for_col[j] == -1:
                sink = j
            else:
                i = row_for_col[j]
            visited_col[j] = True
            remaining_count -= 1
            remaining[best_index] = remaining[remaining_count]

        potential_row[current_row] += min_value
        for i in range(rows):
            if visited_row[i] and i != current_row:
                potential_row[i] += min_value - shortest[col_for_row[i]]
        for j in range(cols):
            if visited_col[j]:
                potential_col[j] -= min_value - shortest[j]

        j = sink
        while True:
            i = path[j]
            row_for_col[j] = i
            previous = col_for_row[i]
            col_for_row[i] = j
            j = previous
            if i == current_row:
                break
    return col_for_row


@njit(cache=True, nogil=True)
def _find_root(parent: np.ndarray, node: int) -> int:
    root = node
    while parent[root] != root:
        root = parent[root]
    while parent[node] != root:
        following = parent[node]
        parent[node] = root
        node = following
    return root


@njit(cache=True, nogil=True)
def match_weights(weights: np.ndarray, min_weight: float) -> np.ndarray:
    """Maximum-weight one-to-one matching on (R, C) `weights`, using only entries >= `min_weight` (> 0).

    Returns (R,) int64: the matched column for each row, -1 where the row is unmatched.
    """
    rows, cols = weights.shape
    col_for_row = np.full(rows, -1, dtype=np.int64)
    if rows == 0 or cols == 0:
        return col_for_row

    # Union-find over rows [0, R) and columns [R, R + C) joined by admissible pairs.
    parent = np.arange(rows + cols)
    degree_row = np.zeros(rows, dtype=np.int64)
    degree_col = np.zeros(cols, dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            if weights[i, j] >= min_weight:
                degree_row[i] += 1
                degree_col[j] += 1
                root_i = _find_root(parent, i)
                root_j = _find_root(parent, rows + j)
                if root_i != root_j:
                    parent[root_j] = root_i

    # Rows whose only admissible column admits only them: the common case, matched without a solver.
    needs_solver = False
    for i in range(rows):
        if degree_row[i] == 1:
            for j in range(cols):
                if weights[i, j] >= min_weight:
                    if degree_col[j] == 1:
                        col_for_row[i] = j
                    else:
                        needs_solver = True
                    break
        elif degree_row[i] > 1:
            needs_solver = True
    if not needs_solver:
        return col_for_row

    # Gather the remaining components and solve each on its own dense block.
    root_of = np.empty(rows + cols, dtype=np.int64)
    for node in range(rows + cols):
        root_of[node] = _find_root(parent, node)
    done = np.zeros(rows + cols, dtype=np.bool_)
    component_rows = np.empty(rows, dtype=np.int64)
    component_cols = np.empty(cols, dtype=np.int64)
    for start in range(rows):
        if degree_row[start] == 0 or col_for_row[start] != -1:
            continue
        root = root_of[start]
        if done[root]:
            continue
        done[root] = True
        row_count = 0
        for i in range(rows):
            if root_of[i] == root:
                component_rows[row_count] = i
                row_count += 1
        col_count = 0
        for j in range(cols):
            if root_of[rows + j] == root:
                component_cols[col_count] = j
                col_count += 1
        transpose = row_count > col_count
        small = col_count if transpose else row_count
        large = row_count if transpose else col_count
        # Cost = -weight on admissible pairs, 0 elsewhere: a zero-cost pair is "no match" and dropped below.
        cost = np.zeros((small, large))
        for a in range(row_count):
            for b in range(col_count):
                w = weights[component_rows[a], component_cols[b]]
                if w >= min_weight:
                    if transpose:
                        cost[b, a] = -w
                    else:
                        cost[a, b] = -w
        assignment = _solve_dense_min_cost(cost)
        for s in range(small):
            t = assignment[s]
            if cost[s, t] < 0.0:
                if transpose:
                    col_for_row[component_rows[t]] = component_cols[s]
                else:
                    col_for_row[component_rows[s]] = component_cols[t]
    return col_for_row


@njit(cache=True, nogil=True)
def match_iou(boxes_tracks_xyxy: np.ndarray, boxes_detections_xyxy: np.ndarray, min_iou: float) -> np.ndarray:
    """Match tracks (T, 4) to detections (D, 4), both xyxy; returns (T,) detection index per track or -1."""
    return match_weights(iou_matrix(boxes_tracks_xyxy, boxes_detections_xyxy), min_iou)
