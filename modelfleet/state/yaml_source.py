"""Parse YAML while remembering the line of every node, so errors can point at ``file:line``.

PyYAML's composer keeps marks on each node; we walk the node tree once and build plain Python
data plus a ``{path: line}`` index, where a path is a tuple of keys and list indexes.
"""

from __future__ import annotations

import sys
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


# Implicit tag of a plain scalar, by its text: it depends on nothing else (SafeLoader has no path
# resolvers), and manifests repeat the same keys and words (``environment``, ``custom``...).
# Resolving runs two regexes per scalar and was ~40 % of the time libyaml spent composing.
_TAG_CACHE: dict[str, str] = {}
_TAG_CACHE_MAX = 50_000
_TAG_CACHE_MAX_LEN = 64


class _Loader(_Base):
    """Safe loading; the libyaml parser when available (the pure-Python one is ~10× slower)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0] and len(value) <= _TAG_CACHE_MAX_LEN:
            tag = _TAG_CACHE.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(_TAG_CACHE) >= _TAG_CACHE_MAX:
                    _TAG_CACHE.clear()
                _TAG_CACHE[value] = tag
            return tag
        return super().resolve(kind, value, implicit)


_STR_TAG = "tag:yaml.org,2002:str"
# Nodes a document may expand to beyond one per character of its text. Without aliases a document
# cannot have more nodes than characters; aliases (``*a``) are expanded, and nested ones grow
# exponentially ("billion laughs"): past this budget the file is rejected instead of hanging.
ALIAS_EXPANSION_BUDGET = 100_000


class _Walker:
    """Builds plain data and the line index of one document from its composed node tree."""

    __slots__ = ("budget", "doc", "loader")

    def __init__(self, loader: _Loader, doc: Document, budget: int) -> None:
        self.loader = loader
        self.doc = doc
        self.budget = budget

    def scalar(self, node: yaml.Node) -> Any:
        if node.tag == _STR_TAG:  # by far the most common: no constructor needed
            return node.value
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # PyYAML's own constructors raise IndexError, KeyError... on odd input
            raise YamlSyntaxError(node.start_mark.line + 1,
                                  f"invalid YAML: {node.value!r} is not a valid {node.tag}") from exc

    def walk(self, node: yaml.Node, path: Path) -> Any:
        """Data of ``node``; records the line of each child (the line of a mapping entry is its key's)."""
        self.budget -= 1
        if self.budget < 0:
            raise YamlSyntaxError(node.start_mark.line + 1,
                                  "invalid YAML: aliases expand to too many nodes")
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        lines = self.doc.lines
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    # Non-string keys cannot name a field; report them under a readable placeholder.
                    key = str(key) if key is not None else "<complex key>"
                key = sys.intern(key)  # the same few field names, thousands of times
                child = (*path, key)
                line = key_node.start_mark.line + 1
                if key in result:
                    self.doc.duplicate_keys.append((child, line))
                lines[child] = line
                result[key] = self.walk(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                child = (*path, i)
                lines[child] = item.start_mark.line + 1
                items.append(self.walk(item, child))
            return items
        return None


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
            doc.lines[()] = doc.start_line
            doc.data = _Walker(loader, doc, len(text) + ALIAS_EXPANSION_BUDGET).walk(node, ())
            yield doc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlSyntaxError(line, f"invalid YAML: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        raise YamlSyntaxError(1, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
