"""YAML for settings files: safe, with the line of every key, and no silent duplicate keys.

PyYAML keeps the last of two equal keys without a word, so a second ``graph_url`` further down a
connection would quietly win. The policies and connections files are both read with this
loader: the first refuses duplicates outright; the second lets its validator name the
connection and field (``Located.duplicates``).
"""

from __future__ import annotations

from typing import Any

import yaml


class Located(dict[Any, Any]):
    """A YAML mapping that remembers its own line, each key's line, and repeated keys."""

    line: int = 0
    lines: dict[Any, int]
    # (key, line of its first occurrence, line of the repeat); the first value is kept.
    duplicates: list[tuple[Any, int, int]]


class LocatedLoader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) giving ``Located`` mappings; refuses duplicate keys."""

    refuse_duplicates = True


class DuplicateRecordingLoader(LocatedLoader):
    """Like LocatedLoader, but records duplicate keys for the caller to report."""

    refuse_duplicates = False


def _construct_mapping(loader: LocatedLoader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    result = Located()
    result.line = node.start_mark.line + 1
    result.lines = {}
    result.duplicates = []
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in result
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value", key_node.start_mark
            ) from None
        line = key_node.start_mark.line + 1
        if duplicate:
            if loader.refuse_duplicates:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            result.duplicates.append((key, result.lines[key], line))
            continue
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = line
    return result


LocatedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """'line N, column M: not valid YAML: <problem>' for a parse error."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{where}not valid YAML: {problem}"
