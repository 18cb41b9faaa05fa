"""Reduced-cost fixing: which option columns of the search's MIP can be left out without losing any
child better than a known value — so that a model too big for gurobipy's size-limited pip licence
(2000 variables) can still be solved by it, exactly.

The bound (why it is exact, whatever the solver): for *any* row multipliers ``y`` (signs made valid
for each row's finite bound) every point of ``lo ≤ A x ≤ hi, 0 ≤ x ≤ ub`` has
``c·x = y·(A x) + d·x ≥ LB(y)`` with reduced costs ``d = c − Aᵀy`` and
``LB(y) = Σ_r (y_r·lo_r if y_r > 0 else y_r·hi_r) + Σ_j min(d_j, 0)·ub_j``; a point with ``x_j = 1``
and ``d_j > 0`` costs at least ``LB(y) + d_j``. So a column with ``LB + d_j`` above the value of a
known child (or above a cutoff) is in no better child and can be fixed at 0. The LP relaxation's
duals (from HiGHS) make the bound tight, but its validity rests only on this float64 arithmetic,
recomputed here from the model, not on the LP solver being right.

Reads and writes nothing; works on the arrays of ``mip.MIP`` (``c, A, lo, hi, ub``). Leaves out:
choosing which columns to try first and solving the smaller model (``mip._reduced``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def highs_lp(c: np.ndarray, A: sp.csr_matrix, lo: np.ndarray, hi: np.ndarray, ub: np.ndarray):
    """The rows and columns as a ``highspy.HighsLp`` (continuous; ``mip._highs`` adds integrality)."""
    import highspy

    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(c), len(lo)
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = c, np.zeros(len(c)), ub
    lp.row_lower_ = np.where(np.isfinite(lo), lo, -inf)
    lp.row_upper_ = np.where(np.isfinite(hi), hi, inf)
    csc = A.tocsc()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = csc.indptr, csc.indices, csc.data
    return lp


def lp_duals(c: np.ndarray, A: sp.csr_matrix, lo: np.ndarray, hi: np.ndarray, ub: np.ndarray
             ) -> np.ndarray | None:
    """Row multipliers of the LP relaxation (HiGHS's dual simplex), or None when the LP is
    infeasible (then so is every child)."""
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.passModel(highs_lp(c, A, lo, hi, ub))
    h.run()
    if h.getModelStatus() == highspy.HighsModelStatus.kInfeasible:
        return None
    # Any other status still leaves multipliers; the bound below is valid for whatever they are.
    y = np.asarray(h.getSolution().row_dual, dtype=float)
    return y if len(y) == len(lo) and np.isfinite(y).all() else np.zeros(len(lo))


def lagrangian_bound(c: np.ndarray, A: sp.csr_matrix, lo: np.ndarray, hi: np.ndarray, ub: np.ndarray,
                     y: np.ndarray) -> tuple[float, np.ndarray]:
    """(LB, d): a lower bound on ``c·x`` over the box-and-rows relaxation, and the reduced costs
    ``d = c − Aᵀy``, for any ``y``. A multiplier whose sign asks for an infinite bound is set to 0
    (a ≤ row cannot bound from below, a ≥ row from above), which keeps the bound valid."""
    y = np.where((y > 0) & ~np.isfinite(lo), 0.0, y)
    y = np.where((y < 0) & ~np.isfinite(hi), 0.0, y)
    d = np.asarray(c, dtype=float) - A.T @ y
    rows = np.where(y > 0, y * np.where(np.isfinite(lo), lo, 0.0), y * np.where(np.isfinite(hi), hi, 0.0))
    return float(rows.sum() + np.minimum(d, 0.0) @ ub), d


def exceeds(value: float | np.ndarray, upper: float) -> bool | np.ndarray:
    """``value > upper`` by more than a relative 1e-9, so float rounding can only keep a column (or
    a model) in play, never rule it out."""
    return value > upper + 1e-9 * (1.0 + abs(upper) + np.abs(value))


def needed(bound: float, d: np.ndarray, upper: float) -> np.ndarray:
    """Columns that may be 1 in a point costing ≤ ``upper``: those with ``d ≤ 0`` or whose bound
    ``bound + d`` does not exceed ``upper``."""
    return (d <= 0) | ~exceeds(bound + d, upper)
