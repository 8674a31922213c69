"""Parse YAML while remembering the line of every node, so errors can point at ``file:line``.

PyYAML's composer keeps marks on each node; we walk the node tree once and build plain Python
data plus a ``{path: line}`` index, where a path is a tuple of keys and list indexes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


class YamlSyntaxError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass
class Document:
    """One YAML document of a file: its data and where each of its parts starts."""

    data: Any
    start_line: int
    lines: dict[Path, int] = field(default_factory=dict)
    # Keys that appear twice in one mapping: YAML allows it, we don't (the second would win silently).
    duplicate_keys: list[tuple[Path, int]] = field(default_factory=list)

    def line_of(self, path: Path) -> int:
        """Line of the deepest known prefix of ``path`` (a missing field points at its parent)."""
        for cut in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                return line
        return self.start_line


_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[misc, valid-type]
    """Safe loading; the libyaml parser when available (the pure-Python one is ~10× slower)."""


def _scalar(loader: _Loader, node: yaml.ScalarNode) -> Any:
    return loader.construct_object(node, deep=True)


def _walk(loader: _Loader, node: yaml.Node, path: Path, doc: Document) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(loader, key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                # Non-string keys cannot name a field; report them under a readable placeholder.
                key = str(key) if key is not None else "<complex key>"
            if key in result:
                doc.duplicate_keys.append(((*path, key), key_node.start_mark.line + 1))
            doc.lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _walk(loader, value_node, (*path, key), doc)
            # The key line is the most useful place to point at for a scalar field.
            doc.lines[(*path, key)] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, (*path, i), doc) for i, item in enumerate(node.value)]
    return _scalar(loader, node)  # type: ignore[arg-type]


def parse_documents(text: str) -> Iterator[Document]:
    """Yield each non-empty document of a multi-document YAML text.

    Raises YamlSyntaxError (with a line) on malformed YAML.
    """
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            doc = Document(data=None, start_line=node.start_mark.line + 1)
            doc.data = _walk(loader, node, (), doc)
            yield doc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlSyntaxError(line, f"invalid YAML: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        raise YamlSyntaxError(1, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
