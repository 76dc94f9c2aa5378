"""JSON text to and from Python, fast: orjson, with the standard library for what it refuses.

orjson parses a 999-member Graph page in a quarter of json's time and writes it in a tenth;
both hold the GIL, which the thread fetching the next page needs (bench/import_members.py:
a 100,000-member import read its pages in 1.2 s instead of 1.7 s).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def parse(text: bytes | str) -> Any:
    """Parsed JSON; ValueError (json.JSONDecodeError) when it is not JSON.

    What orjson refuses but Python's parser reads (a number beyond a double, NaN, a lone
    surrogate escape) is read by Python's, as before.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def dump(value: Any) -> bytes:
    """Compact JSON text of parsed JSON, as valid UTF-8: NaN and infinities become null (JSON
    has none), an integer beyond 64 bits stays exact, a lone surrogate becomes "?"."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, or a str that is not valid UTF-8
        return json.dumps(_finite(value), ensure_ascii=False).encode("utf-8", "replace")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value
