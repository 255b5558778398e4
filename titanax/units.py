"""Human-readable units for byte counts and large numbers, shared by every Titanax table."""

from __future__ import annotations

import math
from numbers import Real

from titanax.exceptions import TitanaxError

__all__ = ["human_bytes", "human_count"]

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_SI_UNITS = ("", "k", "M", "G", "T", "P", "E")


def _check_number(n: object, what: str) -> float:
    if isinstance(n, bool) or not isinstance(n, Real):
        raise TitanaxError(
            f"{what} expects a number, got {type(n).__name__} {n!r}",
            suggestion="pass an int (e.g. an array's nbytes) or a float",
        )
    value = float(n)
    if math.isnan(value) or math.isinf(value):
        raise TitanaxError(f"{what} expects a finite number, got {n!r}",
                           suggestion="check the value you are formatting")
    return value


def human_bytes(n: int) -> str:
    """Formats a byte count with binary units (powers of 1024).

    Counts below 1 KiB are shown exactly; larger ones with two decimals, so columns line up.

    Args:
      n: a number of bytes (an int; a float is accepted and rounded in the same way). Negative
        counts (differences) keep their sign.

    Returns:
      A string such as ``"512 B"``, ``"1.00 KiB"`` or ``"3.25 GiB"``.

    Raises:
      TitanaxError: if ``n`` is not a finite real number.

    Example:
      >>> human_bytes(1536)
      '1.50 KiB'
      >>> human_bytes(8 * 1024**2)
      '8.00 MiB'
    """
    value = _check_number(n, "human_bytes")
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1024:
        return f"{sign}{int(round(value))} B"
    exponent = min(int(math.log(value, 1024)), len(_BINARY_UNITS) - 1)
    scaled = value / 1024**exponent
    if scaled >= 1023.995 and exponent < len(_BINARY_UNITS) - 1:  # avoid "1024.00 KiB"
        exponent += 1
        scaled = value / 1024**exponent
    elif scaled < 1:  # float log rounding just below a power of 1024
        exponent -= 1
        scaled = value / 1024**exponent
    return f"{sign}{scaled:.2f} {_BINARY_UNITS[exponent]}"


def human_count(n: float, unit: str = "") -> str:
    """Formats a large count (FLOPs, parameters) with SI prefixes (powers of 1000).

    Args:
      n: the count.
      unit: appended after the prefix, e.g. ``"FLOP"``.

    Returns:
      A string such as ``"950"``, ``"4.19 M"`` or ``"1.20 GFLOP"``.

    Raises:
      TitanaxError: if ``n`` is not a finite real number.

    Example:
      >>> human_count(4_194_304, "FLOP")
      '4.19 MFLOP'
    """
    value = _check_number(n, "human_count")
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1000:
        text = f"{value:g}" if value != int(value) else f"{int(value)}"
        return f"{sign}{text} {unit}".rstrip()
    exponent = min(int(math.log10(value) // 3), len(_SI_UNITS) - 1)
    scaled = value / 1000**exponent
    if scaled >= 999.995 and exponent < len(_SI_UNITS) - 1:
        exponent += 1
        scaled = value / 1000**exponent
    elif scaled < 1:
        exponent -= 1
        scaled = value / 1000**exponent
    return f"{sign}{scaled:.2f} {_SI_UNITS[exponent]}{unit}"
