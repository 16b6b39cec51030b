"""N:M sparsity masks of weight matrices, plain and transposable (Hubara et al. 2021).

A weight matrix here is [rows, K]: one row per output channel, K its reduction dimension
(a convolution's input channels times kernel positions, unfold.py's layout).  Sparse kernels
need N non-zeros in every run of M consecutive entries of a row (N:M along the reduction).

* :func:`magnitude_mask` keeps the N largest |w| of each run: the best N:M mask for the
  weight's own magnitude.
* :func:`transposable_mask` tiles the matrix into M × M blocks (M consecutive rows by M
  consecutive columns) and keeps at most N per row and per column of each: the mask is N:M
  for the matrix and for its transpose.  At most, not exactly: a sparse format stores N
  entries per run whether or not some are zero, and with exactly N a block can be forced
  to trade a large entry for two small ones.  The best such block is a maximum-weight
  b-matching of the block's rows and columns (a linear program whose constraint matrix is
  totally unimodular, so its vertices are integral).  ``method="exact"`` solves it: by
  scoring at once every allowed block pattern that cannot take another entry, where the
  patterns are few enough to list (:data:`ENUMERATION_LIMIT`; 2:4 allows 7,343, of which 186
  are full), else per block as an assignment problem of N·M + M² nodes a side
  (:func:`_matching_template`), which scipy's linear_sum_assignment solves exactly.  ``method="approx"`` is the greedy
  2-approximation: entries by |w| descending, each kept while its row and column hold
  fewer than N, vectorized over blocks; it keeps at least half the optimum's magnitude.
* :func:`transposable_count` is the number of blocks with exactly N per row and column
  (C(M, N)^M for the plain family, :func:`plain_count`): the *mask diversity* the paper
  compares families by.
* :func:`satisfies` tells whether a matrix's zeros follow an N:M pattern (at most N
  non-zeros per run).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.optimize import linear_sum_assignment

from .errors import ConfigError

ENUMERATION_LIMIT = 50_000  # block patterns listed (once per N:M) to score the full ones by a matrix product; more: an assignment per block
CHUNK_BLOCKS = 1 << 16  # blocks scored per matrix product (memory: chunk x patterns floats)
METHODS = ("exact", "approx")
MASKS = ("magnitude", "transposable", "transposable-approx")  # the mask kinds of mask_of


def parse_pattern(text: str) -> tuple[int, int]:
    """(N, M) of "N:M"; ConfigError unless 0 < N < M."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"sparsity {text!r} is not N:M: write it as two integers, e.g. 2:4") from None
    check_pattern(n, m)
    return n, m


def check_pattern(n: int, m: int) -> None:
    """ConfigError unless 0 < N < M (N = M is dense, N = 0 removes the layer)."""
    if not 0 < n < m:
        raise ConfigError(f"sparsity {n}:{m} needs 0 < N < M (e.g. 2:4): N is kept of every M")


def magnitude_mask(matrix: np.ndarray, n: int, m: int) -> np.ndarray:
    """bool [rows, K]: the N largest |w| of each run of M consecutive columns (ties to the
    earlier column); ConfigError unless M divides K."""
    check_pattern(n, m)
    rows, k = matrix.shape
    if k % m:
        raise ConfigError(f"a reduction dimension of {k} is not a multiple of M={m}: pick an M that divides it")
    runs = np.abs(matrix).reshape(rows, k // m, m)
    kept = np.argsort(-runs, axis=2, kind="stable")[:, :, :n]
    mask = np.zeros(runs.shape, bool)
    np.put_along_axis(mask, kept, True, axis=2)
    return mask.reshape(rows, k)


def transposable_mask(matrix: np.ndarray, n: int, m: int, method: str = "exact") -> np.ndarray:
    """bool [rows, K]: N kept per row and per column of every M × M block; ConfigError unless
    M divides both dimensions."""
    check_pattern(n, m)
    if method not in METHODS:
        raise ConfigError(f"mask method {method!r} is unknown: use one of {METHODS}")
    rows, k = matrix.shape
    if rows % m or k % m:
        raise ConfigError(f"a {rows} x {k} weight does not tile into {m} x {m} blocks: transposable {n}:{m} needs M to divide both")
    blocks = np.abs(matrix).reshape(rows // m, m, k // m, m).transpose(0, 2, 1, 3).reshape(-1, m, m)
    if method == "approx":
        chosen = _greedy(blocks, n)
    elif listed_exactly(n, m):
        chosen = _best_pattern(blocks, n)
    else:
        cost, rows_at, cols_at = _matching_template(n, m)
        work = cost.copy()
        chosen = np.stack([_assignment(block, n, work, rows_at, cols_at) for block in blocks])
    return chosen.reshape(rows // m, k // m, m, m).transpose(0, 2, 1, 3).reshape(rows, k)


def reduction_matrix(op_type: str, weight: np.ndarray, trans_b: bool = False) -> np.ndarray:
    """[rows, K] of a layer's weight in the layout sparse kernels read, one row per output
    channel: a Conv's [M, C/g, *kernel] as [M, *kernel, C/g] (input channels innermost, as
    NHWC kernels reduce), a Gemm's B as [N, K] (transposed unless transB), a MatMul's [K, N]
    transposed."""
    if op_type == "Conv":
        return np.moveaxis(weight, 1, -1).reshape(len(weight), -1)
    return weight if trans_b else weight.T


def from_reduction_matrix(op_type: str, matrix: np.ndarray, weight_shape: tuple[int, ...], trans_b: bool = False) -> np.ndarray:
    """Inverse of :func:`reduction_matrix`: the matrix back in the weight's own shape."""
    if op_type == "Conv":
        moved = (weight_shape[0], *weight_shape[2:], weight_shape[1])
        return np.moveaxis(matrix.reshape(moved), -1, 1)
    return matrix if trans_b else matrix.T


def mask_of(matrix: np.ndarray, n: int, m: int, kind: str) -> np.ndarray:
    """The ``kind`` of mask (one of MASKS) of ``matrix``."""
    if kind == "magnitude":
        return magnitude_mask(matrix, n, m)
    return transposable_mask(matrix, n, m, method="approx" if kind == "transposable-approx" else "exact")


def listed_exactly(n: int, m: int) -> bool:
    """True where the exact transposable mask scores listed patterns (fast); False where it
    solves one assignment problem per block."""
    return _pattern_count(n, m) <= ENUMERATION_LIMIT


def satisfies(matrix: np.ndarray, n: int, m: int, transposable: bool = False) -> bool:
    """True when every run of M consecutive entries of each row of ``matrix`` [rows, K] holds at
    most N non-zeros, and with ``transposable`` every run of M rows of each column in the same
    M × M tiles too."""
    rows, k = matrix.shape
    if k % m or (transposable and rows % m):
        return False
    nonzero = matrix != 0
    if (nonzero.reshape(rows, k // m, m).sum(axis=2) > n).any():
        return False
    return not transposable or not (nonzero.reshape(rows // m, m, k).sum(axis=1) > n).any()


@lru_cache(maxsize=None)
def transposable_count(n: int, m: int) -> int:
    """The number of M × M 0/1 matrices with N ones in every row and every column (dynamic
    programming over how many ones each column still needs)."""
    check_pattern(n, m)

    @lru_cache(maxsize=None)
    def fill(row: int, needs: tuple[int, ...]) -> int:
        if row == m:
            return int(not any(needs))
        # columns are interchangeable: the count depends on the multiset of needs
        return sum(fill(row + 1, tuple(sorted(_taken(needs, cols)))) for cols in _subsets(m, n) if all(needs[c] > 0 for c in cols))

    return fill(0, (n,) * m)


@lru_cache(maxsize=None)
def _pattern_count(n: int, m: int) -> int:
    """Blocks with at most N per row and column: rows one by one, over how many more each column may take."""

    @lru_cache(maxsize=None)
    def fill(row: int, room: tuple[int, ...]) -> int:
        if row == m:
            return 1
        return sum(fill(row + 1, tuple(sorted(_taken(room, cols)))) for size in range(n + 1) for cols in _subsets(m, size)
                   if all(room[c] > 0 for c in cols))

    return fill(0, (n,) * m)


def _taken(room: tuple[int, ...], cols: tuple[int, ...]) -> list[int]:
    left = list(room)
    for c in cols:
        left[c] -= 1
    return left


def plain_count(n: int, m: int) -> int:
    """The masks the plain N:M family allows for an M × M block: C(M, N) per row."""
    return math.comb(m, n) ** m


@lru_cache(maxsize=None)
def _subsets(m: int, n: int) -> tuple[tuple[int, ...], ...]:
    from itertools import combinations

    return tuple(combinations(range(m), n))


@lru_cache(maxsize=None)
def _patterns(n: int, m: int) -> np.ndarray:
    """float32 [m * m, P]: every block pattern with at most N per row and column to which no
    entry can be added (with weights >= 0 the best block is one of them), flattened, as columns."""
    found: list[list[tuple[int, ...]]] = []
    subsets = [cols for size in range(n + 1) for cols in _subsets(m, size)]

    def extend(rows: list[tuple[int, ...]], needs: list[int]) -> None:
        if len(rows) == m:
            found.append(list(rows))
            return
        for cols in subsets:
            if all(needs[c] > 0 for c in cols):
                for c in cols:
                    needs[c] -= 1
                extend(rows + [cols], needs)
                for c in cols:
                    needs[c] += 1

    extend([], [n] * m)
    patterns = np.zeros((len(found), m, m), bool)
    for index, rows in enumerate(found):
        for r, cols in enumerate(rows):
            patterns[index, r, list(cols)] = True
    row_full, col_full = patterns.sum(axis=2) >= n, patterns.sum(axis=1) >= n
    full = ~(~patterns & ~row_full[:, :, None] & ~col_full[:, None, :]).any(axis=(1, 2))  # no entry can be added
    return patterns[full].reshape(-1, m * m).T.astype(np.float32)


def _best_pattern(blocks: np.ndarray, n: int) -> np.ndarray:
    """bool [B, m, m]: the highest-scoring allowed pattern of each block (first of ties)."""
    count, m = len(blocks), blocks.shape[1]
    patterns = _patterns(n, m)
    flat = blocks.reshape(count, m * m).astype(np.float32)
    best = np.empty(count, np.int64)
    for start in range(0, count, CHUNK_BLOCKS):
        best[start:start + CHUNK_BLOCKS] = np.argmax(flat[start:start + CHUNK_BLOCKS] @ patterns, axis=1)
    return patterns.T[best].reshape(count, m, m) > 0.5


def _assignment(block: np.ndarray, n: int, cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """bool [m, m]: the maximum-weight block with at most N per row and column, as a perfect
    matching (:func:`_matching_template`) solved by scipy's linear_sum_assignment."""
    m = len(block)
    cost[rows, cols] = -np.repeat(block, n, axis=0).ravel()
    left, right = linear_sum_assignment(cost)
    used = (left < n * m) & (right < m * m)  # a row slot matched to an entry: the entry is kept
    mask = np.zeros((m, m), bool)
    mask[right[used] // m, right[used] % m] = True
    return mask


@lru_cache(maxsize=None)
def _matching_template(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The assignment problem whose perfect matchings are the blocks with at most N per row
    and column: (cost with the entries' places left at 0, their row and column indices).

    Left: N slots per row (i, k) and an "unused" node per entry (i, j); right: a node per
    entry (i, j) and N slots per column (j, l).  Entry (i, j) is matched to a slot of row i
    (kept, cost −|w_ij|) or to its unused node (cost 0); a kept entry's unused node must then
    take a slot of column j; row and column slots left over pair with each other at cost 0.
    Every other pair is barred."""
    barred = 1e30
    size = n * m + m * m
    cost = np.full((size, size), barred)
    for i in range(m):
        for j in range(m):
            unused, entry = n * m + i * m + j, i * m + j
            cost[unused, entry] = 0.0
            cost[unused, m * m + j * n: m * m + (j + 1) * n] = 0.0
    cost[:n * m, m * m:] = 0.0
    slots = np.arange(n * m)
    rows = np.repeat(slots, m)  # slot (i, k) against entries (i, 0..m-1)
    cols = (slots // n)[:, None] * m + np.arange(m)
    return cost, rows, cols.ravel()


def _greedy(blocks: np.ndarray, n: int) -> np.ndarray:
    """bool [B, m, m]: entries by |w| descending, each kept while its row and column hold
    fewer than N (stable order on ties), over all blocks at once."""
    count, m = len(blocks), blocks.shape[1]
    order = np.argsort(-blocks.reshape(count, m * m), axis=1, kind="stable")
    kept = np.zeros((count, m * m), bool)
    in_row = np.zeros((count, m), np.int64)
    in_col = np.zeros((count, m), np.int64)
    index = np.arange(count)
    for step in range(m * m):
        entry = order[:, step]
        r, c = entry // m, entry % m
        take = (in_row[index, r] < n) & (in_col[index, c] < n)
        kept[index[take], entry[take]] = True
        in_row[index[take], r[take]] += 1
        in_col[index[take], c[take]] += 1
    return kept.reshape(count, m, m)
