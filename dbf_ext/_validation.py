"""Checks of plain Python arguments shared by the pure-Python parts (no compiled code)."""

from __future__ import annotations

import operator

import numpy as np


def as_integer(name: str, value: object, minimum: int, hint: str = "") -> int:
    """``value`` as a Python int ``>= minimum``.

    Accepts anything with ``__index__`` (Python and numpy integers, 0-d integer tensors);
    rejects bools (``True`` as a count is almost always a mistake) and floats with
    ``TypeError``, values below ``minimum`` with ``ValueError`` (``hint`` explains the range).
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}{f' ({hint})' if hint else ''}, got {number}")
    return number
