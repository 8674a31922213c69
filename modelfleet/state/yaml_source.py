"""Parse YAML while remembering the line of every node, so errors can point at ``file:line``.

PyYAML's composer keeps marks on each node; we walk the node tree once and build plain Python
data plus a ``{path: line}`` index, where a path is a tuple of keys and list indexes.

The index is built for the first ``INDEXED_DEPTH`` levels only (where every deployment's
``file:line`` is looked up); a deeper path, asked for when reporting an error, indexes the
document fully then, by parsing its text again. Most manifests never have such an error, and a
full index is most of the objects a loaded tree holds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

# Paths of up to this many parts are indexed while parsing: ("spec", "deployments", 3) is the
# deepest one a loaded catalog asks for without an error to report.
INDEXED_DEPTH = 3


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
    # Set while ``lines`` holds only the paths of up to INDEXED_DEPTH parts: the file's text and
    # which of its documents this is, to index it fully when a deeper path is asked for.
    partial_index_of: tuple[str, int] | None = field(default=None, repr=False, compare=False)

    def line_of(self, path: Path) -> int:
        """Line of the deepest known prefix of ``path`` (a missing field points at its parent)."""
        if len(path) > INDEXED_DEPTH and self.partial_index_of is not None:
            self._index_fully()
        line = self.lines.get(path) if isinstance(path, tuple) else None  # the common case: a known path
        if line is not None:
            return line
        for cut in range(len(path) - 1, -1, -1):
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                return line
        return self.start_line

    def _index_fully(self) -> None:
        assert self.partial_index_of is not None
        text, ordinal = self.partial_index_of
        # The text parsed once already: it parses again the same way.
        for number, doc in enumerate(_parse(text, full_index=True)):
            if number == ordinal:
                self.lines = doc.lines
                break
        self.partial_index_of = None


_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# Implicit tag of a plain scalar, by its text: it depends on nothing else (SafeLoader has no path
# resolvers), and manifests repeat the same keys and words (``environment``, ``custom``...).
# Resolving runs two regexes per scalar and was ~40 % of the time libyaml spent composing.
_TAG_CACHE: dict[str, str] = {}
_TAG_CACHE_MAX = 50_000
_TAG_CACHE_MAX_LEN = 64


_ScalarNode, _MappingNode, _SequenceNode = yaml.ScalarNode, yaml.MappingNode, yaml.SequenceNode


class _Loader(_Base):
    """Safe loading; the libyaml parser when available (the pure-Python one is ~10× slower)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is _ScalarNode and implicit[0]:
            tag = _TAG_CACHE.get(value)
            if tag is not None:
                return tag
            tag = super().resolve(kind, value, implicit)
            if len(value) <= _TAG_CACHE_MAX_LEN:
                if len(_TAG_CACHE) >= _TAG_CACHE_MAX:
                    _TAG_CACHE.clear()
                _TAG_CACHE[value] = tag
            return tag
        return super().resolve(kind, value, implicit)

    # The composer tells the resolver about every node it enters and leaves, for path resolvers;
    # SafeLoader has none (see _TAG_CACHE), so these do nothing, in less time (~7 % of composing).
    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        pass

    def ascend_resolver(self) -> None:
        pass


_STR_TAG = "tag:yaml.org,2002:str"
# Keys whose mapping SafeConstructor.flatten_mapping rewrites (``<<`` merges, ``=`` values).
_FLATTENED_KEY_TAGS = frozenset({"tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"})
# Scalars whose constructed value is immutable and depends only on tag and text: memoized.
_CACHED_SCALAR_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
                                 "tag:yaml.org,2002:null"})
_SCALAR_CACHE: dict[tuple[str, str], Any] = {}
# Nodes a document may expand to beyond one per character of its text. Without aliases a document
# cannot have more nodes than characters; aliases (``*a``) are expanded, and nested ones grow
# exponentially ("billion laughs"): past this budget the file is rejected instead of hanging.
ALIAS_EXPANSION_BUDGET = 100_000


_TOO_MANY_NODES = "invalid YAML: aliases expand to too many nodes"


class _FullWalkNeeded(Exception):
    """The document has what only the full walk handles: a merge key, or a duplicate key deeper
    than the index (its error needs the path)."""


class _Walker:
    """Builds plain data and the line index of one document from its composed node tree.

    ``walk`` indexes every path and flattens merge keys as SafeConstructor does. ``walk_partial``
    indexes paths of up to INDEXED_DEPTH parts and raises _FullWalkNeeded where it would differ
    from ``walk``; it does much less (no path tuple, no index entry, no flattening per node).
    """

    __slots__ = ("budget", "doc", "loader")

    def __init__(self, loader: _Loader, doc: Document, budget: int) -> None:
        self.loader = loader
        self.doc = doc
        self.budget = budget

    def scalar(self, node: yaml.Node) -> Any:
        tag = node.tag
        if tag == _STR_TAG:  # by far the most common: no constructor needed
            return node.value
        cache_key = (tag, node.value) if tag in _CACHED_SCALAR_TAGS else None
        if cache_key is not None and cache_key in _SCALAR_CACHE:
            return _SCALAR_CACHE[cache_key]
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # PyYAML's own constructors raise IndexError, KeyError... on odd input
            raise YamlSyntaxError(node.start_mark.line + 1,
                                  f"invalid YAML: {node.value!r} is not a valid {node.tag}") from exc
        if cache_key is not None:
            if len(_SCALAR_CACHE) >= _TAG_CACHE_MAX:
                _SCALAR_CACHE.clear()
            _SCALAR_CACHE[cache_key] = value
        return value

    def _key(self, key_node: yaml.Node) -> str:
        key = self.scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            # Non-string keys cannot name a field; report them under a readable placeholder.
            key = str(key) if key is not None else "<complex key>"
        return sys.intern(key)  # the same few field names, thousands of times

    def _spend(self, node: yaml.Node) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise YamlSyntaxError(node.start_mark.line + 1, _TOO_MANY_NODES)

    def walk(self, node: yaml.Node, path: Path) -> Any:
        """Data of ``node``; records the line of each child (the line of a mapping entry is its key's)."""
        self._spend(node)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        lines = self.doc.lines
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._key(key_node)
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

    def walk_partial(self, node: yaml.Node, path: Path) -> Any:
        """``walk`` for a node at ``path`` (at most INDEXED_DEPTH parts): indexes its children
        while their paths are that short, then continues with ``_data``."""
        self._spend(node)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        indexed = len(path) < INDEXED_DEPTH
        lines = self.doc.lines
        if isinstance(node, yaml.MappingNode):
            pairs = node.value
            for key_node, _ in pairs:
                if key_node.tag in _FLATTENED_KEY_TAGS:
                    raise _FullWalkNeeded
            result: dict[Any, Any] = {}
            for key_node, value_node in pairs:
                key = self._key(key_node)
                if not indexed:
                    if key in result:
                        raise _FullWalkNeeded
                    result[key] = self._data(value_node)
                    continue
                child = (*path, key)
                line = key_node.start_mark.line + 1
                if key in result:
                    self.doc.duplicate_keys.append((child, line))
                lines[child] = line
                result[key] = self.walk_partial(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            if not indexed:
                return [self._data(item) for item in node.value]
            items = []
            for i, item in enumerate(node.value):
                child = (*path, i)
                lines[child] = item.start_mark.line + 1
                items.append(self.walk_partial(item, child))
            return items
        return None

    def _data(self, node: yaml.Node) -> Any:
        """Data of a node below the index: the same visits, budget and checks as ``walk``."""
        self.budget -= 1
        if self.budget < 0:
            raise YamlSyntaxError(node.start_mark.line + 1, _TOO_MANY_NODES)
        kind = type(node)
        if kind is _ScalarNode:
            return node.value if node.tag == _STR_TAG else self.scalar(node)
        if kind is _MappingNode:
            pairs = node.value
            for key_node, _ in pairs:
                if key_node.tag in _FLATTENED_KEY_TAGS:
                    raise _FullWalkNeeded
            result: dict[Any, Any] = {}
            for key_node, value_node in pairs:
                if type(key_node) is _ScalarNode and key_node.tag == _STR_TAG:
                    key = sys.intern(key_node.value)
                else:
                    key = self._key(key_node)
                if key in result:
                    raise _FullWalkNeeded
                if type(value_node) is _ScalarNode and value_node.tag == _STR_TAG:
                    # The most common value, without a call: what _data does for it.
                    self.budget -= 1
                    if self.budget < 0:
                        raise YamlSyntaxError(value_node.start_mark.line + 1, _TOO_MANY_NODES)
                    result[key] = value_node.value
                else:
                    result[key] = self._data(value_node)
            return result
        if kind is _SequenceNode:
            return [self._data(item) for item in node.value]
        raise _FullWalkNeeded  # a node class of another composer: walk() knows what to do


def parse_documents(text: str) -> Iterator[Document]:
    """Yield each non-empty document of a multi-document YAML text.

    Raises YamlSyntaxError (with a line) on malformed YAML.
    """
    return _parse(text, full_index=False)


def _document(node: yaml.Node) -> Document:
    doc = Document(data=None, start_line=node.start_mark.line + 1)
    doc.lines[()] = doc.start_line
    return doc


def _parse(text: str, full_index: bool) -> Iterator[Document]:
    loader = _Loader(text)
    budget = len(text) + ALIAS_EXPANSION_BUDGET
    try:
        ordinal = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            doc = None
            if not full_index:
                try:
                    doc = _document(node)
                    doc.data = _Walker(loader, doc, budget).walk_partial(node, ())
                    doc.partial_index_of = (text, ordinal)
                except _FullWalkNeeded:
                    doc = None
            if doc is None:
                doc = _document(node)
                doc.data = _Walker(loader, doc, budget).walk(node, ())
            ordinal += 1
            yield doc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlSyntaxError(line, f"invalid YAML: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        raise YamlSyntaxError(1, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
