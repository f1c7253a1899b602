"""MQTT 5 topic names and topic filters: validation, shared subscriptions, matching.

A *topic name* is what a message is published to (``plant/line1/temp``); a *topic filter* is
what a subscription asks for, and may hold wildcards (MQTT 5 §4.7):

- ``+`` stands for exactly one level, an empty one included, and must be a whole level;
- ``#`` stands for any number of levels, *including the parent level* (``a/#`` matches ``a``),
  and must be the whole last level;
- a filter whose first level is a wildcard never matches a topic starting with ``$``
  (``$SYS/...`` is only seen through a filter that spells out ``$SYS``);
- ``$share/<group>/<filter>`` is a shared subscription (§4.8.2): the broker hands each message
  to one subscriber of the group; it matches like ``<filter>``.

Both are UTF-8 strings of 1 to 65535 bytes without NUL (§1.5.4, §4.7.3). The specification
adds that they SHOULD NOT contain control characters (U+0001..U+001F, U+007F..U+009F) or
Unicode non-characters and that a receiver MAY treat them as a malformed packet; mosquitto does,
and closes the connection. A filter typed in a form with a stray tab would therefore knock the
whole broker connection over in a loop, so :func:`validate_filter` and :func:`validate_topic`
refuse those characters too, with a message that says which one and where.

:class:`FilterSet` answers "which of my subscriptions does this received topic belong to?"
with a trie keyed by level, so the cost follows the topic's depth, not the number of filters.

>>> matches("sport/tennis/player1/#", "sport/tennis/player1")
True
>>> matches("sport/+", "sport")
False
>>> matches("+/monitor/Clients", "$SYS/monitor/Clients")
False
>>> split_shared("$share/consumers/plant/#")
('consumers', 'plant/#')
>>> validate_filter("a/#/b")
Traceback (most recent call last):
...
mqtt_engine.topics.TopicError: '#' must be the last level of a filter: 'a/#/b'
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_BYTES = 65535
"""The longest topic name or filter, in UTF-8 bytes (a two-byte length prefix on the wire)."""

SHARE_PREFIX = "$share/"

# Characters a topic may not hold: NUL (forbidden), C0/C1 controls and non-characters (brokers
# such as mosquitto reject them as malformed UTF-8 and drop the connection).
_NONCHARACTERS = "".join(
    f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17)
)
_FORBIDDEN = re.compile(f"[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef{_NONCHARACTERS}]")


class TopicError(ValueError):
    """A topic name or filter that MQTT 5 (or the broker) would refuse; the message says why."""


def _quote(text: str, limit: int = 80) -> str:
    """``repr`` of ``text``, shortened when long: error messages stay one readable line."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[: limit - 20]!r}… ({len(text):,} characters)"


def _check_string(text: str, kind: str) -> None:
    """The rules topic names and filters share: non-empty, encodable, short, no controls."""
    if not isinstance(text, str):
        raise TopicError(f"{kind} must be a string, not {type(text).__name__}")
    if not text:
        raise TopicError(f"{kind} is empty")
    bad = _FORBIDDEN.search(text)
    if bad:
        char, position = bad.group(), bad.start()
        if char == "\x00":
            what = "a NUL character"
        elif ord(char) < 0xA0:
            what = f"a control character (U+{ord(char):04X})"
        else:
            what = f"a Unicode non-character (U+{ord(char):04X})"
        raise TopicError(f"{kind} contains {what} at position {position}: {_quote(text)}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise TopicError(
            f"{kind} contains a lone surrogate (U+{ord(text[exc.start]):04X}) at position "
            f"{exc.start}, which UTF-8 cannot encode: {_quote(text)}"
        ) from None
    if size > MAX_BYTES:
        raise TopicError(f"{kind} is longer than {MAX_BYTES} bytes in UTF-8 ({size:,} bytes)")


def _check_levels(topic_filter: str, shown: str) -> None:
    """Wildcard placement in a plain filter; ``shown`` is the filter as the user wrote it."""
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                raise TopicError(f"'#' must occupy a whole level: {_quote(shown)}")
            if index != last:
                raise TopicError(f"'#' must be the last level of a filter: {_quote(shown)}")
        if "+" in level and level != "+":
            raise TopicError(f"'+' must occupy a whole level: {_quote(shown)}")


def validate_share_group(group: str) -> None:
    """Raise :class:`TopicError` unless ``group`` can name a shared subscription group."""
    if not group:
        raise TopicError("share group is empty")
    if any(char in group for char in "/+#"):
        raise TopicError(f"share group may not contain '/', '+' or '#': {_quote(group)}")
    _check_string(group, "share group")


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``(group, filter)`` of a ``$share/<group>/<filter>`` filter, ``(None, filter)`` otherwise.

    The whole filter is validated: raises :class:`TopicError` when it is not a valid filter.

    >>> split_shared("sensors/+/temp")
    (None, 'sensors/+/temp')
    """
    _check_string(topic_filter, "topic filter")
    if not topic_filter.startswith(SHARE_PREFIX):
        _check_levels(topic_filter, topic_filter)
        return None, topic_filter
    group, slash, plain = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not group or not slash or not plain:
        raise TopicError(
            f"shared subscription needs a group name and a filter: {_quote(topic_filter)}"
        )
    if "+" in group or "#" in group:
        raise TopicError(f"share group may not contain '/', '+' or '#': {_quote(topic_filter)}")
    _check_levels(plain, topic_filter)
    return group, plain


def validate_filter(topic_filter: str) -> None:
    """Raise :class:`TopicError` unless ``topic_filter`` is a valid (maybe shared) filter."""
    split_shared(topic_filter)


def validate_topic(topic: str) -> None:
    """Raise :class:`TopicError` unless ``topic`` is a valid topic name to publish to.

    Wildcards are filter syntax (§4.7.1). Names starting with ``$`` are allowed (AWS IoT, for
    one, expects publishes to ``$aws/...``), except ``$share/``: that prefix means a shared
    subscription, and brokers refuse such publishes (mosquitto 2 logs "Denied PUBLISH").
    """
    _check_string(topic, "topic name")
    if "+" in topic or "#" in topic:
        raise TopicError(f"topic names may not contain wildcards: {_quote(topic)}")
    if topic.startswith(SHARE_PREFIX):
        raise TopicError(
            f"topic names may not start with '$share/' (shared subscriptions): {_quote(topic)}"
        )


def _plain_matches(levels: list[str], topic: str) -> bool:
    names = topic.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(names) or (level != "+" and level != names[index]):
            return False
    return len(levels) == len(names)


def matches(topic_filter: str, topic: str) -> bool:
    """Whether a message published to ``topic`` is delivered to ``topic_filter`` (§4.7).

    Raises :class:`TopicError` when the filter is invalid; the topic is taken as received.

    >>> [matches("a/#", t) for t in ("a", "a/b/c", "ab")]
    [True, True, False]
    >>> matches("$share/group/sensors/+", "sensors/t1")
    True
    """
    _group, plain = split_shared(topic_filter)
    return _plain_matches(plain.split("/"), topic)


class _Node(Generic[T]):
    """One level of the trie: literal children, the ``+`` child, and the filters ending here."""

    __slots__ = ("children", "exact", "multi", "plus")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.plus: _Node[T] | None = None
        self.exact: dict[str, tuple[int, T]] = {}  # filters ending at this level
        self.multi: dict[str, tuple[int, T]] = {}  # filters ending with "/#" below this level

    def child(self, level: str) -> _Node[T]:
        """The existing child for a filter level (``+`` included)."""
        node = self.plus if level == "+" else self.children[level]
        if node is None:
            raise KeyError(level)
        return node

    def is_empty(self) -> bool:
        return not (self.children or self.plus or self.exact or self.multi)


class FilterSet(Generic[T]):
    """Topic filters mapped to values, matched against received topics.

    A filter is a key as written, so ``sensors/#`` and ``$share/g/sensors/#`` are two entries
    (both match ``sensors/t1``). Adding a filter again replaces its value and keeps its place.

    >>> subscriptions = FilterSet()
    >>> subscriptions.add("plant/+/temp", 1)
    >>> subscriptions.add("plant/#", 2)
    >>> subscriptions.match("plant/line1/temp")
    [1, 2]
    >>> subscriptions.match("office/temp")
    []
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._entries: dict[str, tuple[int, list[str]]] = {}  # filter -> (order, plain levels)
        self._counter = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, topic_filter: object) -> bool:
        return topic_filter in self._entries

    def __iter__(self) -> Iterator[str]:
        """The filters, in the order they were first added."""
        return iter(self._entries)

    def add(self, topic_filter: str, value: T) -> None:
        """Map ``topic_filter`` to ``value``; raises :class:`TopicError` for an invalid filter."""
        _group, plain = split_shared(topic_filter)
        if topic_filter in self._entries:
            order, levels = self._entries[topic_filter]
        else:
            order, levels = self._counter, plain.split("/")
            self._counter += 1
            self._entries[topic_filter] = (order, levels)
        node = self._root
        for level in levels:
            if level == "#":
                node.multi[topic_filter] = (order, value)
                return
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                node = node.children.setdefault(level, _Node())
        node.exact[topic_filter] = (order, value)

    def remove(self, topic_filter: str) -> None:
        """Forget ``topic_filter``; raises ``KeyError`` when it was never added."""
        _order, levels = self._entries.pop(topic_filter)
        path: list[tuple[_Node[T], str]] = []  # (parent, level) down to the filter's node
        node = self._root
        for level in levels:
            if level == "#":
                del node.multi[topic_filter]
                break
            path.append((node, level))
            node = node.child(level)
        else:
            del node.exact[topic_filter]
        # Prune the nodes left empty, so a long-running set does not keep dead branches.
        for parent, level in reversed(path):
            if not parent.child(level).is_empty():
                break
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]

    def match(self, topic: str) -> list[T]:
        """The values of every filter matching ``topic``, in the order the filters were added."""
        names = topic.split("/")
        depth_max = len(names)
        no_wildcard_first = topic.startswith("$")
        found: list[tuple[int, T]] = []
        stack: list[tuple[_Node[T], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wildcards = not (depth == 0 and no_wildcard_first)
            if node.multi and wildcards:
                found.extend(node.multi.values())
            if depth == depth_max:
                found.extend(node.exact.values())
                continue
            child = node.children.get(names[depth])
            if child is not None:
                stack.append((child, depth + 1))
            if node.plus is not None and wildcards:
                stack.append((node.plus, depth + 1))
        found.sort(key=lambda entry: entry[0])
        return [value for _order, value in found]
