"""Topic names, filters and matching, checked against the examples of MQTT 5 §4.7 and §4.8."""

from __future__ import annotations

import doctest
import itertools
import random

import pytest

from mqtt_engine import topics
from mqtt_engine.topics import (
    FilterSet,
    TopicError,
    matches,
    split_shared,
    validate_filter,
    validate_share_group,
    validate_topic,
)


def test_doctests():
    assert doctest.testmod(topics).failed == 0


@pytest.mark.parametrize(
    "topic_filter",
    [
        "sport/tennis/player1",
        "sport/tennis/player1/#",
        "sport/#",
        "#",
        "+",
        "+/+",
        "/+",
        "sport/+/player1",
        "sport/tennis/+",
        "/",
        "//",
        "a//b",
        "$SYS/#",
        "$SYS/monitor/+",
        "with space/and ümlaut/日本",
        "ACCOUNTS",
        "$share/consumer1/sport/tennis/+",
        "$share/g/#",
        "$share/g/$SYS/#",
        "$share",  # no slash: an ordinary filter named "$share"
        "x" * 65535,
        "é" * 32767,  # 65534 bytes
    ],
)
def test_valid_filters(topic_filter):
    validate_filter(topic_filter)


@pytest.mark.parametrize(
    ("topic_filter", "error"),
    [
        ("", "topic filter is empty"),
        ("a/#/b", "'#' must be the last level of a filter: 'a/#/b'"),
        ("#/a", "'#' must be the last level of a filter"),
        ("sport/tennis#", "'#' must occupy a whole level: 'sport/tennis#'"),
        ("a/##", "'#' must occupy a whole level"),
        ("a/b+/c", "'+' must occupy a whole level: 'a/b+/c'"),
        ("sport+", "'+' must occupy a whole level"),
        ("++", "'+' must occupy a whole level"),
        ("a/\x00b", "topic filter contains a NUL character at position 2: 'a/\\x00b'"),
        ("a\tb", "contains a control character (U+0009) at position 1"),
        ("a/b\n", "contains a control character (U+000A) at position 3"),
        ("a\x7f", "contains a control character (U+007F)"),
        ("a\x85", "contains a control character (U+0085)"),
        ("a\ufffe", "contains a Unicode non-character (U+FFFE)"),
        ("a\U0010ffff", "contains a Unicode non-character (U+10FFFF)"),
        ("a\ufdd0", "contains a Unicode non-character (U+FDD0)"),
        ("a/\udc80", "contains a lone surrogate (U+DC80) at position 2"),
        ("x" * 65536, "longer than 65535 bytes in UTF-8 (65,536 bytes)"),
        ("é" * 32768, "longer than 65535 bytes in UTF-8"),
        ("$share/g", "shared subscription needs a group name and a filter: '$share/g'"),
        ("$share/", "shared subscription needs a group name and a filter"),
        ("$share/g/", "shared subscription needs a group name and a filter"),
        ("$share//a", "shared subscription needs a group name and a filter"),
        ("$share/g+/a", "share group may not contain '/', '+' or '#': '$share/g+/a'"),
        ("$share/#/a", "share group may not contain '/', '+' or '#'"),
        ("$share/g/a/#/b", "'#' must be the last level of a filter: '$share/g/a/#/b'"),
    ],
)
def test_invalid_filters(topic_filter, error):
    with pytest.raises(TopicError) as info:
        validate_filter(topic_filter)
    assert error in str(info.value)
    assert "\x00" not in str(info.value)  # messages end up in text columns and logs


def test_topic_error_is_a_value_error():
    assert issubclass(TopicError, ValueError)


def test_long_filter_is_shortened_in_the_message():
    with pytest.raises(TopicError) as info:
        validate_filter("a" * 1000 + "/#/b")
    message = str(info.value)
    assert message.startswith("'#' must be the last level of a filter: 'aaa")
    assert message.endswith("… (1,004 characters)")
    assert len(message) < 200


def test_a_filter_must_be_a_string():
    with pytest.raises(TopicError, match="must be a string, not bytes"):
        validate_filter(b"a/b")


@pytest.mark.parametrize(
    "topic",
    ["sport/tennis/player1", "/", "a//b", "$SYS/broker/load", "$aws/things/x/shadow/update"],
)
def test_valid_topic_names(topic):
    validate_topic(topic)


@pytest.mark.parametrize(
    ("topic", "error"),
    [
        ("", "topic name is empty"),
        ("a/+/b", "topic names may not contain wildcards: 'a/+/b'"),
        ("a/#", "topic names may not contain wildcards"),
        ("a+b", "topic names may not contain wildcards"),
        ("a\x00", "topic name contains a NUL character at position 1"),
        ("a\r", "topic name contains a control character (U+000D)"),
        ("x" * 65536, "topic name is longer than 65535 bytes in UTF-8"),
        ("$share/g/a", "topic names may not start with '$share/'"),
    ],
)
def test_invalid_topic_names(topic, error):
    with pytest.raises(TopicError) as info:
        validate_topic(topic)
    assert error in str(info.value)


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("a/b", (None, "a/b")),
        ("$share/consumer1/sport/tennis/+", ("consumer1", "sport/tennis/+")),
        ("$share/g/#", ("g", "#")),
        ("$share/g/$share/h/x", ("g", "$share/h/x")),
        ("$shared/g/x", (None, "$shared/g/x")),
    ],
)
def test_split_shared(topic_filter, expected):
    assert split_shared(topic_filter) == expected


def test_split_shared_validates():
    with pytest.raises(TopicError, match="'#' must be the last level"):
        split_shared("a/#/b")


def test_share_group():
    validate_share_group("consumers-1")
    with pytest.raises(TopicError, match="share group is empty"):
        validate_share_group("")
    for bad in ("a/b", "a+", "#"):
        with pytest.raises(TopicError, match="share group may not contain"):
            validate_share_group(bad)
    with pytest.raises(TopicError, match="share group contains a control character"):
        validate_share_group("a\tb")


# (filter, topic, matches): the examples of MQTT 5 §4.7.1 and §4.7.2, then edge cases.
MATCHING = [
    # §4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/tennis/player1/#", "sport/tennis", False),
    ("sport/#", "sport", True),
    ("#", "sport/tennis/player1", True),
    ("#", "/", True),
    # §4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    # §4.7.2 topics beginning with $
    ("#", "$SYS/broker/clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("+", "$SYS", False),
    ("$SYS/#", "$SYS", True),
    ("a/+", "a/$b", True),  # only the first level is protected
    # §4.7.3 case sensitivity, empty levels, literal levels
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/b", "a/b/", False),
    ("a/b/", "a/b", False),
    ("a/#", "ab", False),
    ("a/b", "a/b", True),
    # §4.8.2 shared subscriptions match like their filter
    ("$share/g/sport/+", "sport/tennis", True),
    ("$share/g/sport/+", "$share/g/sport/tennis", False),
    ("$share/g/#", "$SYS/x", False),
    ("$share/g/#", "anything/at/all", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHING)
def test_matches(topic_filter, topic, expected):
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHING)
def test_filter_set_agrees_with_the_spec_table(topic_filter, topic, expected):
    filters: FilterSet[str] = FilterSet()
    filters.add(topic_filter, "hit")
    assert filters.match(topic) == (["hit"] if expected else [])


def test_matches_rejects_an_invalid_filter():
    with pytest.raises(TopicError, match="'\\+' must occupy a whole level"):
        matches("a/b+", "a/b+")


def test_filter_set_returns_every_match_in_insertion_order():
    filters: FilterSet[int] = FilterSet()
    for number, topic_filter in enumerate(
        ["#", "plant/+/temp", "plant/line1/temp", "$share/g/plant/#", "plant/#", "office/#"]
    ):
        filters.add(topic_filter, number)
    assert filters.match("plant/line1/temp") == [0, 1, 2, 3, 4]
    assert filters.match("plant") == [0, 3, 4]
    assert filters.match("office") == [0, 5]
    assert filters.match("$SYS/uptime") == []
    assert len(filters) == 6


def test_filter_set_add_replaces_and_keeps_the_place():
    filters: FilterSet[str] = FilterSet()
    filters.add("a/#", "first")
    filters.add("a/b", "second")
    filters.add("a/#", "replaced")
    assert len(filters) == 2
    assert filters.match("a/b") == ["replaced", "second"]
    assert list(filters) == ["a/#", "a/b"]


def test_filter_set_remove():
    filters: FilterSet[str] = FilterSet()
    filters.add("a/+/c", "plus")
    filters.add("a/b/c", "exact")
    filters.add("a/#", "multi")
    filters.add("$share/g/a/b/c", "shared")
    filters.remove("a/b/c")
    assert "a/b/c" not in filters
    assert "a/+/c" in filters
    assert filters.match("a/b/c") == ["plus", "multi", "shared"]
    filters.remove("a/#")
    filters.remove("$share/g/a/b/c")
    assert filters.match("a/b/c") == ["plus"]
    assert filters.match("a") == []
    filters.remove("a/+/c")
    assert len(filters) == 0
    assert filters.match("a/b/c") == []
    assert filters._root.is_empty()  # no dead branches kept
    with pytest.raises(KeyError):
        filters.remove("a/+/c")


def test_filter_set_remove_keeps_branches_still_in_use():
    filters: FilterSet[int] = FilterSet()
    filters.add("a/b/c/d", 1)
    filters.add("a/b", 2)
    filters.remove("a/b/c/d")
    assert filters.match("a/b") == [2]
    filters.add("a/b/c/d", 3)
    assert filters.match("a/b/c/d") == [3]


def test_filter_set_rejects_invalid_filters():
    filters: FilterSet[int] = FilterSet()
    with pytest.raises(TopicError, match="'#' must be the last level"):
        filters.add("a/#/b", 1)
    assert len(filters) == 0


def test_filter_set_agrees_with_matches_on_random_filters():
    """Hundreds of filters over a small alphabet, so that overlaps are everywhere."""
    rng = random.Random(20240518)
    words = ["a", "b", "", "$x"]
    filters: FilterSet[str] = FilterSet()
    added: list[str] = []
    while len(added) < 400:
        levels = [rng.choice([*words, "+"]) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            levels.append("#")
        topic_filter = "/".join(levels)
        if not topic_filter:
            continue  # a single empty level is the empty filter, which is invalid
        if rng.random() < 0.1:
            topic_filter = f"$share/g{rng.randint(1, 2)}/{topic_filter}"
        if topic_filter not in filters:
            filters.add(topic_filter, topic_filter)
            added.append(topic_filter)
    for topic_filter in rng.sample(added, 100):  # remove some, to exercise pruning
        filters.remove(topic_filter)
        added.remove(topic_filter)
    assert len(filters) == len(added) == 300
    for depth in range(1, 5):
        for levels in itertools.product(words, repeat=depth):
            topic = "/".join(levels)
            expected = [f for f in added if matches(f, topic)]
            assert filters.match(topic) == expected, topic
