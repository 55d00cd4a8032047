"""Plain Python values from numpy and pandas scalars (for database rows, JSON and metadata)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def py_scalar(value: Any) -> Any:
    """``value`` as a plain Python scalar; NaN, ``pd.NA`` and ``pd.NaT`` become None.

    numpy scalars become the Python type they hold (``np.float64`` -> float, ``np.int64`` -> int,
    ``np.str_`` -> str, ``np.bool_`` -> bool); anything else is returned unchanged.
    """
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
