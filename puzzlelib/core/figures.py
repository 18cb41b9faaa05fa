"""What every stage's figures share: the headless backend and a moving average.

Importing this module picks matplotlib's Agg backend when no interactive one is set (papermill and
the tests have no display; JupyterLab's inline backend is left alone), so each stage's ``plots``
module imports it before ``matplotlib.pyplot``. Reads and writes nothing. Leaves out: the figures
themselves (``<stage>/plots.py``, next to the stage they draw).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() in ("", "agg") else None
import numpy as np  # noqa: E402


def smooth(y: list[float], window: int) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if len(y) < window or window <= 1:
        return y
    kernel = np.ones(window) / window
    head = np.array([y[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])
