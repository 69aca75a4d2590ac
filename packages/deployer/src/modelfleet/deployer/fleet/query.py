"""Target conditions: a small query language over device tags and reported state.

Modelled on Azure IoT Hub target conditions::

    tags.site = 'plant-1' AND tags.hw = 'rpi4'
    (tags.site IN ['a', 'b'] OR tags.ring = 0) AND NOT reported.model.version = 3
    *

Grammar (keywords are case-insensitive)::

    query      := '*' | or_expr
    or_expr    := and_expr ('OR' and_expr)*
    and_expr   := not_expr ('AND' not_expr)*
    not_expr   := 'NOT' not_expr | '(' or_expr ')' | comparison
    comparison := path op literal | path ['NOT'] 'IN' '[' literal (',' literal)* ']'
    op         := '=' | '!=' | '<>' | '<' | '<=' | '>' | '>='
    path       := name ('.' name)*        e.g. deviceId, tags.site, reported.model.version
    literal    := 'text' | "text" | number | true | false | null

`properties.reported.` is accepted as an alias of `reported.`, as in IoT Hub.
A comparison whose field is missing on a device is false (also for `!=`), as in
IoT Hub; `NOT` negates whatever its operand gave. Numbers compare numerically,
strings lexically; a number never equals a string.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modelfleet.deployer.errors import DeployerError

Literal_ = str | int | float | bool | None


class QueryError(DeployerError):
    """A target condition could not be parsed; the message names the position."""

    default_hint = (
        "write conditions like: tags.site = 'plant-1' AND reported.model.version >= 2 (see docs/fleet.md)"
    )


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^']|'')*'|"(?:[^"\\]|\\.)*")
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![A-Za-z_]))
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[()\[\],*])
  | (?P<name>[A-Za-z_$][A-Za-z0-9_$-]*(?:\.[A-Za-z_$0-9][A-Za-z0-9_$-]*)*)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}


@dataclass(frozen=True)
class _Token:
    kind: str  # str, num, op, punct, name, kw, end
    text: str
    pos: int  # 1-based column
    value: Any = None


def _error(query: str, pos: int, message: str) -> QueryError:
    caret = " " * (pos - 1) + "^"
    return QueryError(f"invalid target condition at position {pos}: {message}\n  {query}\n  {caret}")


def _tokenize(query: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(query):
        m = _TOKEN.match(query, i)
        if not m:
            ch = query[i]
            if ch in "'\"":
                raise _error(query, i + 1, "unterminated string")
            raise _error(query, i + 1, f"unexpected character {ch!r}")
        kind = m.lastgroup or ""
        text = m.group()
        if kind == "str":
            if text[0] == "'":
                value: Any = text[1:-1].replace("''", "'")
            else:
                value = re.sub(r"\\(.)", r"\1", text[1:-1])
            tokens.append(_Token("str", text, i + 1, value))
        elif kind == "num":
            value = float(text) if any(c in text for c in ".eE") else int(text)
            tokens.append(_Token("num", text, i + 1, value))
        elif kind == "name":
            low = text.lower()
            if low in _KEYWORDS:
                tokens.append(_Token("kw", low, i + 1))
            else:
                tokens.append(_Token("name", text, i + 1))
        elif kind in ("op", "punct"):
            tokens.append(_Token(kind, "!=" if text == "<>" else text, i + 1))
        i = m.end()
    tokens.append(_Token("end", "", len(query) + 1))
    return tokens


Predicate = Callable[[Mapping[str, Any]], bool]
_MISSING = object()


def _lookup(doc: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = doc
    for part in path:
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _compare(op: str, left: Any, right: Literal_) -> bool:
    if left is _MISSING:
        return False
    if op in ("=", "!="):
        # 1 = 1.0, but a number never equals a string and true never equals 1
        equal = left == right if _is_number(left) and _is_number(right) else type(left) is type(right) and left == right
        return equal if op == "=" else not equal
    if _is_number(left) and _is_number(right):
        a, b = float(left), float(right)  # type: ignore[arg-type]
    elif isinstance(left, str) and isinstance(right, str):
        a, b = left, right  # type: ignore[assignment]
    else:
        return False
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


class _Parser:
    def __init__(self, query: str) -> None:
        self.query = query
        self.tokens = _tokenize(query)
        self.i = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def _describe(self, tok: _Token) -> str:
        return "end of query" if tok.kind == "end" else repr(tok.text)

    def fail(self, expected: str) -> QueryError:
        return _error(self.query, self.tok.pos, f"expected {expected}, found {self._describe(self.tok)}")

    def accept(self, kind: str, text: str | None = None) -> _Token | None:
        tok = self.tok
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def parse(self) -> Predicate:
        if self.tok.kind == "punct" and self.tok.text == "*":
            self.i += 1
            if self.tok.kind != "end":
                raise self.fail("end of query after '*'")
            return lambda _doc: True
        if self.tok.kind == "end":
            raise self.fail("a condition or '*'")
        pred = self.or_expr()
        if self.tok.kind != "end":
            raise self.fail("AND, OR or end of query")
        return pred

    def or_expr(self) -> Predicate:
        parts = [self.and_expr()]
        while self.accept("kw", "or"):
            parts.append(self.and_expr())
        if len(parts) == 1:
            return parts[0]
        return lambda doc: any(p(doc) for p in parts)

    def and_expr(self) -> Predicate:
        parts = [self.not_expr()]
        while self.accept("kw", "and"):
            parts.append(self.not_expr())
        if len(parts) == 1:
            return parts[0]
        return lambda doc: all(p(doc) for p in parts)

    def not_expr(self) -> Predicate:
        if self.accept("kw", "not"):
            inner = self.not_expr()
            return lambda doc: not inner(doc)
        if self.accept("punct", "("):
            inner = self.or_expr()
            if not self.accept("punct", ")"):
                raise self.fail("')'")
            return inner
        return self.comparison()

    def literal(self) -> Literal_:
        tok = self.tok
        if tok.kind in ("str", "num"):
            self.i += 1
            return tok.value  # type: ignore[no-any-return]
        if tok.kind == "kw" and tok.text in ("true", "false", "null"):
            self.i += 1
            return {"true": True, "false": False, "null": None}[tok.text]
        raise self.fail("a value ('text', a number, true, false or null)")

    def comparison(self) -> Predicate:
        tok = self.accept("name")
        if tok is None:
            raise self.fail("a field such as tags.site, reported.model.version or deviceId")
        parts = tuple(tok.text.split("."))
        if parts[:2] == ("properties", "reported"):
            parts = ("reported", *parts[2:])
        path = parts
        negate = False
        if self.tok.kind == "kw" and self.tok.text == "not":
            self.i += 1
            negate = True
            if not (self.tok.kind == "kw" and self.tok.text == "in"):
                raise self.fail("IN after NOT")
        if self.accept("kw", "in"):
            if not self.accept("punct", "["):
                raise self.fail("'[' to start the IN list")
            values = [self.literal()]
            while self.accept("punct", ","):
                values.append(self.literal())
            if not self.accept("punct", "]"):
                raise self.fail("',' or ']' in the IN list")

            def in_list(doc: Mapping[str, Any]) -> bool:
                left = _lookup(doc, path)
                if left is _MISSING:
                    return False
                found = any(_compare("=", left, v) for v in values)
                return found != negate

            return in_list
        op = self.accept("op")
        if op is None:
            raise self.fail("a comparison (=, !=, <, <=, >, >=) or IN")
        value = self.literal()
        return lambda doc: _compare(op.text, _lookup(doc, path), value)


_TAG_KEY = re.compile(r"[A-Za-z0-9_$][A-Za-z0-9_$-]*")  # a path segment of `_TOKEN`'s names


def check_tag_key(key: str) -> str:
    """A tag key a target condition can name as `tags.<key>` (one name: no dots, no spaces)."""
    if not _TAG_KEY.fullmatch(key):
        raise QueryError(
            f"tag key {key!r} could not be used in a target condition",
            hint="use letters, digits, '_' or '-' (not first), no dots or spaces",
        )
    return key


@dataclass(frozen=True)
class TargetQuery:
    """A parsed target condition; `matches(document)` evaluates it."""

    text: str
    _predicate: Predicate

    def matches(self, document: Mapping[str, Any]) -> bool:
        return self._predicate(document)


def parse_query(text: str) -> TargetQuery:
    """Parse a target condition; raises QueryError naming the position of the problem."""
    stripped = text.strip()
    return TargetQuery(stripped, _Parser(stripped).parse())
