"""Quantities users write in manifests and config: memory (``512Mi``), CPUs, durations (``30s``)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import TypeVar

_MEMORY_UNITS = {
    "": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

_Parsed = TypeVar("_Parsed", int, float)
_MEMO_MAX = 10_000


def _memoized_text(parse: Callable[[object], _Parsed]) -> Callable[[object], _Parsed]:
    """Remember what ``parse`` made of each text: a manifest tree repeats the same few quantities
    (``256Mi``, ``30s``) thousands of times. Other inputs, and texts that fail, are parsed each time."""
    memo: dict[str, _Parsed] = {}

    @functools.wraps(parse)
    def parse_memoized(value: object) -> _Parsed:
        if type(value) is not str:
            return parse(value)
        found = memo.get(value)
        if found is None:
            found = parse(value)
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[value] = found
        return found

    return parse_memoized


@_memoized_text
def parse_memory(value: object) -> int:
    """Bytes from ``1Gi``, ``512Mi``, ``2G`` or a plain integer of bytes."""
    if isinstance(value, bool):
        raise ValueError("memory must be a quantity such as 512Mi or 2Gi, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("memory must not be negative")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("memory must be a finite quantity such as 512Mi or 2Gi")
        if value < 0:
            raise ValueError("memory must not be negative")
        return int(value)
    if not isinstance(value, str):
        raise ValueError("memory must be a quantity such as 512Mi or 2Gi")
    match = _MEMORY_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise ValueError(f"{value!r} is not a memory quantity (use e.g. 512Mi, 2Gi, 1G)")
    number = float(match.group(1)) * _MEMORY_UNITS[unit]
    if not math.isfinite(number):  # e.g. 400 digits: int(inf) would raise OverflowError
        raise ValueError(f"{value!r} is not a memory quantity: too large")
    return int(number)


def format_memory(num_bytes: int) -> str:
    for unit, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if num_bytes >= size and num_bytes % (size // 1024 or 1) == 0:
            value = num_bytes / size
            return f"{value:g}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{num_bytes}"


@_memoized_text
def parse_cpus(value: object) -> float:
    """CPUs as a float; accepts ``2``, ``0.5`` and Kubernetes-style millicores ``500m``."""
    if isinstance(value, bool):
        raise ValueError("cpus must be a number such as 1 or 0.5")
    if isinstance(value, int | float):
        cpus = float(value)
    elif isinstance(value, str) and value.endswith("m") and value[:-1].isdigit():
        cpus = int(value[:-1]) / 1000
    else:
        try:
            cpus = float(str(value))
        except ValueError:
            raise ValueError(f"{value!r} is not a CPU count (use e.g. 1, 0.5 or 500m)") from None
    if cpus <= 0 or cpus != cpus or cpus == float("inf"):
        raise ValueError("cpus must be a positive number")
    return cpus


@_memoized_text
def parse_duration(value: object) -> float:
    """Seconds from ``30s``, ``5m``, ``1h30m``, ``500ms`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration must look like 30s, 5m or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("a duration must look like 30s, 5m or 1h")
    text = value.strip()
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 1h30m, 500ms)")
    return sum(float(n) * _DURATION_SECONDS[u] for n, u in parts)


def format_cpus(cpus: float) -> str:
    return f"{cpus:g}"
