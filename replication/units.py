"""Parsing and checking of what operators type: sizes and names."""
import re

from .errors import UsageError

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
           "P": 1 << 50, "E": 1 << 60}
_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([KMGTPE]?)(?:i?B)?\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def parse_size(text, what="size"):
    """'64K' -> 65536.  Plain bytes or K/M/G/T/P/E suffixes, powers of 1024,
    as nbdkit parses them."""
    if isinstance(text, int):
        n = text
    else:
        m = _SIZE_RE.fullmatch(str(text))
        if not m:
            raise UsageError(f"invalid {what} {text!r}: use bytes or a K/M/G/T suffix, e.g. 64K")
        n = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if n <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be positive")
    if n >= 1 << 63:
        raise UsageError(f"invalid {what} {text!r}: too large")
    return n


def parse_pow2(text, what, lo, hi):
    n = parse_size(text, what)
    if n & (n - 1):
        raise UsageError(f"invalid {what} {text!r}: must be a power of two")
    if not lo <= n <= hi:
        raise UsageError(f"invalid {what} {text!r}: must be between {fmt_size(lo)} and {fmt_size(hi)}")
    return n


def check_name(name, what="snappoint name"):
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"invalid {what} {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")
    return name


def fmt_size(n):
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
