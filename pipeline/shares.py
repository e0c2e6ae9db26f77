"""Shares as the decimals users write them, in exact rationals: a band's ends, a batch's part.

exact_share(0.1) + exact_share(0.2) == Fraction(3, 10)   # True; 0.1 + 0.2 is not 0.3 in floats
share_of(50, 0.29)                                       # 15
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction


def exact_share(value: numbers.Real) -> Fraction:
    """A share as the decimal the user wrote it: 0.1 is 1/10, not the binary float nearest to it, so
    sums like skip + keep and products like share x total are exact (0.2 + 0.1 is 0.3 here, and
    0.30000000000000004 in floats, enough to move a sample across a band's boundary). Floats of any
    kind (NumPy's float32 too) are read as the shortest decimal that prints them."""
    if isinstance(value, numbers.Rational):
        return Fraction(value)
    return Fraction(str(value))


def share_of(n: int, share: float) -> int:
    """`share` of n items, rounded half up, exactly (0.29 of 50 is 15, where float arithmetic gives
    14.499999999999998 and rounds to 14)."""
    return math.floor(exact_share(share) * n + Fraction(1, 2))
