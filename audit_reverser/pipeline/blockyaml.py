"""Block YAML written directly, byte for byte as PyYAML's ``CSafeDumper`` writes it.

Every kept write is dumped once, and PyYAML spends most of that time in its Python
representer (a node per value, resolver regexes per node) before libyaml walks the nodes
again. Kubernetes objects need a small part of YAML: mappings with string keys, lists,
strings, numbers, booleans and null. :func:`emit` writes that part itself, taking libyaml's
decisions (``src/emitter.c``: ``analyze_scalar``, ``select_scalar_style``, the block scalar
hints, the indentless lists inside mappings) and PyYAML's (the representers, the dumper's
implicit resolvers). Anything it is not certain to write the same, it refuses with
:class:`Unsupported` and the caller dumps the whole document with PyYAML instead: tabs and
other characters libyaml escapes, line breaks other than ``\\n``, strings libyaml would
double-quote or fold, long keys, other types, very deep nesting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Characters libyaml writes as they are (IS_PRINTABLE with allow_unicode), less the line
# breaks U+2028/U+2029 and the BOM. Everything else makes it double-quote the string.
_PRINTABLE = re.compile("[\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd]*")
_PRINTABLE_LINES = re.compile("[\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd]*")
# First characters after which libyaml never writes a string plain.
_INDICATORS = frozenset("#,[]{}&*!|>'\"%@`")
# libyaml folds a plain or quoted line at a space past the dumper's width (2**20): shorter
# strings can never reach it at any depth we write (see MAX_DEPTH).
_MAX_LINE = 1 << 19
# libyaml writes a longer key (in UTF-8 bytes) as an explicit ``? key``.
_MAX_KEY = 128
# Texts of keys and short one-line strings seen, by value: names, labels and field names
# repeat from object to object. Emptied when full, so it follows what the cluster sends.
_CACHE_SIZE = 20_000
_CACHED_LENGTH = 80
# Deeper documents go to PyYAML, which decides whether they nest too deeply
# (RecursionError), exactly as before.
MAX_DEPTH = 100


class Unsupported(Exception):
    """A value this module does not write exactly as PyYAML would."""


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyOrder:
    """Keys sorted, except that ``first`` ranks keys of the document to the front, and
    ``within`` does the same in the document's values (``metadata``: ``name`` first)."""

    first: Mapping[str, int]
    within: Mapping[str, Mapping[str, int]]


Resolvers = Mapping[str | None, list[tuple[str, re.Pattern[str]]]]


class Emitter:
    """Writes documents for one PyYAML dumper class's implicit resolvers."""

    def __init__(self, resolvers: Resolvers) -> None:
        wildcard = [regex for _, regex in resolvers.get(None, [])]
        # A string is written plain only if no implicit resolver claims it (it would read
        # back as a bool, number, null...); PyYAML picks the resolvers by first character.
        self._resolvers = {
            first: [regex for _, regex in found] + wildcard
            for first, found in resolvers.items()
            if first is not None
        }
        self._wildcard = wildcard
        # ... and one pattern of them all per first character, for the test of a new string:
        # one match instead of four or five for a string starting with a digit.
        self._claims = {first: _any_of(found) for first, found in self._resolvers.items()}
        self._wildcard_claim = _any_of(wildcard)
        self.key_texts: dict[str, str] = {}
        self.scalar_texts: dict[str, str] = {}
        self._float = [
            regex for tag, regex in resolvers.get(".", []) if tag == "tag:yaml.org,2002:float"
        ]

    def emit(
        self,
        document: Mapping[str, Any],
        order: KeyOrder | None,
        trailer: Mapping[str, Any] | None = None,
    ) -> str:
        """The YAML of ``document``, its keys in ``order`` (None: as given), then the keys
        of ``trailer`` as given; raises :class:`Unsupported`."""
        if type(document) is not dict or (trailer is not None and type(trailer) is not dict):
            raise Unsupported("the document is not a dict")
        if not document and not trailer:
            return "{}\n"
        if trailer and any(key in document for key in trailer):
            raise Unsupported("the trailer repeats a key")
        writer = _Writer(self, order)
        writer.mapping(document, 0, "", 0, order.first if order else None)
        if trailer:
            # The same root mapping goes on: a root mapping's lines stand on their own.
            writer.order = None
            writer.mapping(trailer, 0, "", 0, None)
        if writer.open_ended:
            writer.out.append("...\n")  # libyaml's end marker after a ``|+`` block
        return "".join(writer.out)

    def plain_allowed(self, value: str) -> bool:
        """Whether libyaml writes ``value`` (printable, one line, not empty) plain in a
        block collection, and PyYAML reads it back as a string."""
        first = value[0]
        if (
            first in _INDICATORS
            or first == " "
            or value[-1] == " "
            or value[-1] == ":"
            or ": " in value
            or " #" in value
            or (first in "?:-" and (len(value) == 1 or value[1] == " "))
            or value.startswith(("---", "..."))
        ):
            return False
        claim = self._claims.get(first, self._wildcard_claim)
        return claim is None or claim.match(value) is None

    def float_text(self, value: float) -> str:
        """PyYAML's ``represent_float``."""
        if value != value:
            return ".nan"
        if value == float("inf"):
            return ".inf"
        if value == float("-inf"):
            return "-.inf"
        text = repr(value).lower()
        if "." not in text and "e" in text:
            text = text.replace("e", ".0e", 1)
        # It must read back as a float, or PyYAML would add a tag.
        resolvers = self._resolvers.get(text[0], self._wildcard)
        for regex in resolvers:
            if regex.match(text):
                if regex in self._float:
                    return text
                break
        raise Unsupported(f"float {text} does not read back as a float")


_FLAGS = ((re.ASCII, "a"), (re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))


def _any_of(patterns: list[re.Pattern[str]]) -> re.Pattern[str] | None:
    """A pattern that matches where any of ``patterns`` matches (each with its own flags),
    or None for no patterns."""
    if not patterns:
        return None
    branches = []
    for pattern in patterns:
        flags = "".join(letter for flag, letter in _FLAGS if pattern.flags & flag)
        if pattern.flags & re.VERBOSE:  # a comment would run on to the end of the line
            branches.append(f"(?{flags}x:{pattern.pattern}\n)")
        else:
            branches.append(f"(?{flags}:{pattern.pattern})")
    return re.compile("|".join(branches))


def _printable(value: str, pattern: re.Pattern[str]) -> bool:
    return (value.isascii() and value.isprintable()) or pattern.fullmatch(value) is not None


class _Writer:
    def __init__(self, emitter: Emitter, order: KeyOrder | None) -> None:
        self.emitter = emitter
        self.order = order
        self.out: list[str] = []
        self.open_ended = False

    def mapping(
        self,
        value: dict[str, Any],
        indent: int,
        first_prefix: str,
        depth: int,
        rank: Mapping[str, int] | None,
    ) -> None:
        """``key: value`` lines at column ``indent``; the first starts after ``first_prefix``
        (the rest of a ``-`` line, or a new line's indentation)."""
        order = self.order
        if order is None:
            keys: list[str] | dict[str, Any] = value
        elif rank:
            keys = sorted(value, key=lambda k: (rank.get(k, len(rank)), k))
        else:
            keys = sorted(value)
        out = self.out
        # The caches are read here first: most keys and many values were written before.
        key_texts = self.emitter.key_texts
        scalar_texts = self.emitter.scalar_texts
        within = order.within if order is not None and depth == 0 else None
        prefix = first_prefix
        pad = " " * indent
        for key in keys:
            item = value[key]
            text = key_texts.get(key) if type(key) is str else None
            if text is None:
                text = self.key(key)
            if type(item) is str and "\n" not in item:  # most values: no call to node()
                out.append(f"{prefix}{text}:{scalar_texts.get(item) or self.scalar(item)}")
            else:
                out.append(f"{prefix}{text}:")
                self.node(item, indent, True, depth, within.get(key) if within else None)
            prefix = pad

    def node(
        self,
        value: Any,
        indent: int,
        in_mapping: bool,
        depth: int,
        rank: Mapping[str, int] | None = None,
    ) -> None:
        """``value`` after its key's ``:`` or its item's ``-``; ``indent`` is the column of
        that key or dash."""
        kind = type(value)
        out = self.out
        if kind is str:
            if "\n" in value:
                self.literal(value, indent + 2)
            else:
                out.append(self.scalar(value))
        elif kind is dict or kind is list:
            if not value:
                out.append(" {}\n" if kind is dict else " []\n")
                return
            if depth >= MAX_DEPTH:
                raise Unsupported("nested too deeply")
            if kind is dict:
                if in_mapping:
                    out.append("\n")
                    self.mapping(value, indent + 2, " " * (indent + 2), depth + 1, rank)
                else:  # the first key goes on the dash's line
                    self.mapping(value, indent + 2, " ", depth + 1, rank)
            elif in_mapping:  # libyaml writes a list in a mapping without indenting it
                out.append("\n")
                self.sequence(value, indent, " " * indent, depth + 1)
            else:
                self.sequence(value, indent + 2, " ", depth + 1)
        elif value is None:
            out.append(" null\n")
        elif kind is bool:
            out.append(" true\n" if value else " false\n")
        elif kind is int:
            out.append(f" {value}\n")
        elif kind is float:
            out.append(f" {self.emitter.float_text(value)}\n")
        else:
            raise Unsupported(f"a {kind.__name__} value")

    def sequence(self, items: list[Any], indent: int, first_prefix: str, depth: int) -> None:
        out = self.out
        prefix = first_prefix
        pad = " " * indent
        for item in items:
            out.append(prefix)
            out.append("-")
            self.node(item, indent, False, depth)
            prefix = pad

    def key(self, key: Any) -> str:
        keys = self.emitter.key_texts
        text = keys.get(key) if type(key) is str else None
        if text is None:
            text = self.new_key(key)
            if len(keys) >= _CACHE_SIZE:
                keys.clear()
            keys[key] = text
        return text

    def new_key(self, key: Any) -> str:
        if type(key) is not str:
            raise Unsupported(f"a {type(key).__name__} key")
        if len(key) > _MAX_KEY or (not key.isascii() and len(key.encode()) > _MAX_KEY):
            raise Unsupported("a long key")
        if not _printable(key, _PRINTABLE):
            raise Unsupported("a key with special characters")
        if key and self.emitter.plain_allowed(key):
            return key
        return "'" + key.replace("'", "''") + "'"

    def scalar(self, value: str) -> str:
        scalars = self.emitter.scalar_texts
        text = scalars.get(value)
        if text is None:
            text = self.new_scalar(value)
            if len(value) <= _CACHED_LENGTH:
                if len(scalars) >= _CACHE_SIZE:
                    scalars.clear()
                scalars[value] = text
        return text

    def new_scalar(self, value: str) -> str:
        """A one-line string: plain, else single-quoted (libyaml allows it for printable
        strings without line breaks)."""
        if len(value) > _MAX_LINE or not _printable(value, _PRINTABLE):
            raise Unsupported("a string libyaml double-quotes or folds")
        if value and self.emitter.plain_allowed(value):
            return f" {value}\n"
        return " '" + value.replace("'", "''") + "'\n"

    def literal(self, value: str, indent: int) -> None:
        """A string with line breaks, which the canonical representer asks to be a ``|``
        block; libyaml double-quotes it instead after a space at a line end."""
        if value[-1] == " " or " \n" in value or not _printable(value, _PRINTABLE_LINES):
            raise Unsupported("a multi-line string libyaml double-quotes")
        indent_hint = "2" if value[0] in " \n" else ""
        if value[-1] != "\n":
            chomp = "-"
        elif len(value) == 1 or value[-2] == "\n":
            chomp = "+"
        else:
            chomp = ""
        self.open_ended = chomp == "+"
        lines = value.split("\n")
        if value[-1] == "\n":
            lines.pop()
        pad = " " * indent
        self.out.append(f" |{indent_hint}{chomp}\n")
        if "" in lines:  # an empty line has no indentation
            self.out.append("".join(f"{pad}{line}\n" if line else "\n" for line in lines))
        else:
            self.out.append(pad + f"\n{pad}".join(lines) + "\n")
