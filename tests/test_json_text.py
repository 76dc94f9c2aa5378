"""JSON in and out of the pipeline: fast, and nothing an app sends makes it fail."""

from __future__ import annotations

import json

import pytest

from groupsync_pipeline.json_text import dump, parse


def test_parse_reads_what_python_reads() -> None:
    assert parse(b'{"a": [1, "\\u00e9", null, true], "a2": {"b": 1.5}}') == {
        "a": [1, "é", None, True],
        "a2": {"b": 1.5},
    }
    # orjson refuses these; Python's parser reads them, as the connectors always did.
    nan, inf, surrogate = parse(b'[NaN, 1e400, "\\ud800"]')
    assert nan != nan and inf == float("inf") and surrogate == "\ud800"
    assert parse("[12345678901234567890123]")[0] == pytest.approx(1.2345678901234568e22)
    with pytest.raises(ValueError):
        parse(b"<html>gateway timeout</html>")


def test_dump_is_valid_json_whatever_it_holds() -> None:
    value = [float("nan"), float("-inf"), 10**30, "\ud800x", {"k": "é\n\u2028"}, None]
    text = dump(value)
    assert json.loads(text.decode("utf-8")) == [None, None, 10**30, "?x", {"k": "é\n\u2028"}, None]
    assert b"NaN" not in text and b"Infinity" not in text
    assert dump({"a": [1, True]}) == b'{"a":[1,true]}'
