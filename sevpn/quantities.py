"""
Quantities as people write and read them: durations (C{3h 12m}), sizes
(C{1.5 MiB}), rates (C{10 Mbit/s}), and parsing the rates an operator
types (C{10M}, C{500k}).  Pure: text output only; JSON keeps raw numbers.
"""

from __future__ import annotations

import re
from typing import Optional

#: The fastest rate a policy may name: 1 Tbit/s (a typo guard, not a limit of the hub).
MAX_RATE = 10**12

_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(?:bit/s|bps|bit)?")
_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_rate(text: str) -> int:
    """
    Bits per second from C{1500}, C{500k}, C{10M}, C{1.5G} (SI: k = 1000),
    optionally followed by C{bit/s}; C{0} means no limit.  Raises
    C{ValueError} with a sentence.
    """
    match = _RATE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"{text!r} is not a rate: give bits per second like 1500, 500k, 10M or 1G (0 for no limit)")
    value = float(match.group(1)) * _SI[match.group(2).lower()]
    if value > MAX_RATE:
        raise ValueError(f"{text!r} is more than 1 Tbit/s")
    if 0 < value < 1:
        raise ValueError(f"{text!r} is less than 1 bit/s")
    return int(value)


def format_duration(seconds: Optional[float]) -> str:
    """C{42s}, C{5m 3s}, C{3h 12m}, C{2d 4h}; C{-} for none."""
    if seconds is None:
        return "-"
    s = int(round(max(0.0, float(seconds))))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s}s" if s else f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d {h}h" if h else f"{d}d"


def _scaled(value: float, base: int, units) -> str:
    unit = units[0]
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            break
        value /= base
    if unit == units[0]:
        return f"{int(value)} {unit}"
    return f"{value:.1f} {unit}".replace(".0 ", " ")


def format_size(size: Optional[int]) -> str:
    """Bytes as C{512 B}, C{1.5 KiB}, C{12 MiB}, C{3.2 GiB}; C{-} for none."""
    if size is None:
        return "-"
    return _scaled(float(size), 1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def format_rate(bits_per_second: Optional[int]) -> str:
    """C{10 Mbit/s}, C{500 kbit/s}; C{-} for none or 0 (no limit)."""
    if not bits_per_second:
        return "-"
    return _scaled(float(bits_per_second), 1000, ("bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"))
