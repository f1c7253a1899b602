"""Stored payloads: the base64 column, hashes, previews and JSON keys."""

from __future__ import annotations

import base64
import doctest
import json
import random

import pytest

from mqtt_engine import payload
from mqtt_engine.payload import (
    PayloadError,
    from_column,
    json_value,
    pretty_json,
    preview,
    sha256_hex,
    to_column,
)

MIB = 1024 * 1024


def test_doctests():
    assert doctest.testmod(payload).failed == 0


# Column conversion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"hello", b"\x00\x01\x02", bytes(range(256)), b"\xff\xfe invalid utf-8 \xc3", b"x" * MIB],
)
def test_column_round_trip_is_byte_exact(data):
    stored = to_column(data)
    assert stored == base64.b64encode(data)  # Odoo's convention for Binary(attachment=False)
    assert from_column(stored) == data
    assert from_column(memoryview(stored)) == data  # what psycopg2 returns for bytea
    assert from_column(stored.decode("ascii")) == data


def test_column_empty_is_null_as_in_odoo():
    assert to_column(b"") is None
    assert to_column(None) is None
    assert from_column(None) == b""
    assert from_column(False) == b""  # an empty Binary field reads as False in the ORM
    assert from_column(memoryview(b"")) == b""


def test_column_accepts_line_wrapped_base64():
    assert from_column(base64.encodebytes(b"y" * 200)) == b"y" * 200


@pytest.mark.parametrize("value", [b"raw \x00 bytes", "not base64!", "abc", "é"])
def test_column_refuses_values_that_are_not_base64(value):
    with pytest.raises(PayloadError, match="column value is not base64"):
        from_column(value)


def test_sha256_hex():
    assert sha256_hex(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# Preview -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", ""),
        (b"21.5", "21.5"),
        (b'{"t": 21.5}', '{"t": 21.5}'),
        ("température 21,5 °C ✓ 🌡".encode(), "température 21,5 °C ✓ 🌡"),
        (b"line 1\r\nline 2\tcol", "line 1\r\nline 2\tcol"),
        (b"\x00", "binary, 1 byte: 00"),
        (bytes([0, 255, 16]), "binary, 3 bytes: 00 ff 10"),
        (b"NUL\x00inside", "binary, 10 bytes: 4e 55 4c 00 69 6e 73 69 64 65"),
        (b"\x1b[31mred\x1b[0m", "binary, 12 bytes: 1b 5b 33 31 6d 72 65 64 1b 5b 30 6d"),
        ("C1 \x85".encode(), "binary, 5 bytes: 43 31 20 c2 85"),
        (b"caf\xe9", "binary, 4 bytes: 63 61 66 e9"),  # Latin-1, not UTF-8
        (b"\xed\xa0\x80", "binary, 3 bytes: ed a0 80"),  # an encoded surrogate is invalid
        (b"euro \xe2\x82", "binary, 7 bytes: 65 75 72 6f 20 e2 82"),  # truncated at the end
    ],
)
def test_preview(data, expected):
    assert preview(data).startswith(expected)
    if len(data) <= 32:
        assert preview(data) == expected


def test_preview_of_a_long_binary_payload_shows_32_bytes():
    data = bytes(range(256)) * 4
    expected = "binary, 1,024 bytes: " + " ".join(f"{b:02x}" for b in range(32)) + " …"
    assert preview(data) == expected


def test_preview_cuts_long_text_with_the_size():
    data = b"0123456789" * 1235  # 12,350 bytes
    assert preview(data) == "0123456789" * 50 + "… (12,350 bytes)"
    assert preview(data, limit=3) == "012… (12,350 bytes)"


def test_preview_at_exactly_the_limit_is_not_cut():
    assert preview(b"x" * 500) == "x" * 500
    assert preview(b"x" * 501) == "x" * 500 + "… (501 bytes)"
    assert preview("é".encode() * 500) == "é" * 500


def test_preview_counts_characters_not_bytes():
    emoji = "🌡".encode()  # 4 bytes each
    assert preview(emoji * 10, limit=10) == "🌡" * 10
    assert preview(emoji * 11, limit=10) == "🌡" * 10 + "… (44 bytes)"
    # The bounded prefix (4 bytes a character) ends inside a character: still text.
    data = b"a" + emoji * 20
    assert preview(data, limit=10) == "a" + "🌡" * 9 + "… (81 bytes)"


def test_preview_of_one_mebibyte():
    text = "mesure 21,5 °C; " * (MIB // 17 + 1)
    shown = preview(text.encode())
    assert shown.startswith("mesure 21,5 °C; ")
    assert shown.endswith(f"… ({len(text.encode()):,} bytes)")
    assert len(shown) < 530

    binary = random.Random(1).randbytes(MIB)
    shown = preview(b"\x00" + binary)
    assert shown.startswith("binary, 1,048,577 bytes: 00 ")
    assert len(shown) < 150


def test_preview_decodes_only_a_bounded_prefix():
    """Invalid bytes after what is shown do not make the preview binary: they were never read."""
    data = b"a" * 600 + b"\xff" * (10 * MIB)
    assert preview(data) == "a" * 500 + f"… ({len(data):,} bytes)"
    # Within the shown characters they do.
    assert preview(b"a" * 100 + b"\xff" * 1000).startswith("binary, 1,100 bytes: 61 61")


def test_preview_accepts_memoryview_and_none():
    assert preview(memoryview(b"abc")) == "abc"
    assert preview(bytearray(b"abc")) == "abc"
    assert preview(None) == ""


def test_preview_never_returns_nul_and_never_raises():
    rng = random.Random(42)
    samples = [rng.randbytes(rng.randint(0, 3000)) for _ in range(300)]
    samples += [bytes([b]) * 700 for b in range(256)]
    samples += ["ü\x00".encode() * 400, "日本".encode() * 1000 + b"\x00"]
    for data in samples:
        for limit in (0, 1, 7, 500):
            text = preview(data, limit)
            assert "\x00" not in text
            text.encode("utf-8")  # storable as PostgreSQL text


# JSON --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        (b'{"id": "abc-1"}', "id", "abc-1"),
        (b'{"id": 42}', "id", "42"),
        (b'{"id": -7}', "id", "-7"),
        (b'{"id": 123456789012345678901234567890}', "id", "123456789012345678901234567890"),
        (b'{"id": 1.5}', "id", "1.5"),
        (b'{"id": true}', "id", "true"),
        (b'{"meta": {"msg_id": "m-9"}}', "meta.msg_id", "m-9"),
        (b'{"items": [{"id": 1}, {"id": 2}]}', "items.1.id", "2"),
        (b'[{"id": "first"}]', "0.id", "first"),
        ('{"clé": "valeur ✓"}'.encode(), "clé", "valeur ✓"),
        (b'{"id": "\\u00e9"}', "id", "é"),
        (b' \n{"id": "x"}\n ', "id", "x"),
    ],
)
def test_json_value(data, path, expected):
    assert json_value(data, path) == expected


@pytest.mark.parametrize(
    ("data", "path", "error"),
    [
        (b'{"a"\xff: 1}', "a", "payload is not valid UTF-8 (byte 0xff at position 4)"),
        (b"caf\xc3", "a", "payload is not valid UTF-8 (byte 0xc3 at position 3)"),
        (b"", "id", "payload is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"hello", "id", "payload is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        (b'{"id": 1', "id", "payload is not valid JSON: Expecting ',' delimiter"),
        (b'{"id": NaN}', "id", "payload is not valid JSON: NaN is not a JSON value"),
        (b"[" * 100_000, "id", "payload is not valid JSON"),
        (b'{"meta": {}}', "meta.msg_id", "JSON key 'meta.msg_id' not found"),
        (b'{"meta": 5}', "meta.msg_id", "JSON key 'meta.msg_id' not found"),
        (b"[1, 2]", "id", "JSON key 'id' not found"),
        (b"[1, 2]", "2", "JSON key '2' not found"),
        (b'{"id": {"x": 1}}', "id", "JSON key 'id' holds an object, not a scalar"),
        (b'{"id": [1]}', "id", "JSON key 'id' holds an array, not a scalar"),
        (b'{"id": null}', "id", "JSON key 'id' is null"),
        (b'{"id": ""}', "id", "JSON key 'id' holds an empty string"),
        (b'{"id": "a\\u0000b"}', "id", "JSON key 'id' holds a string with a NUL character"),
        (b'{"id": "\\ud800"}', "id", "JSON key 'id' holds a string with a lone surrogate"),
        (b'{"id": 1}', "", "JSON key path is empty"),
    ],
)
def test_json_value_errors(data, path, error):
    with pytest.raises(PayloadError) as info:
        json_value(data, path)
    assert error in str(info.value)


def test_payload_error_is_a_value_error():
    assert issubclass(PayloadError, ValueError)


def test_pretty_json():
    assert (
        pretty_json(b'{"a":1,"b":[true,null]}')
        == '{\n  "a": 1,\n  "b": [\n    true,\n    null\n  ]\n}'
    )
    assert pretty_json(b"[]") == "[]"
    assert pretty_json('{"t":"°C"}'.encode()) == '{\n  "t": "°C"\n}'
    assert json.loads(pretty_json(b'{"z": 1, "a": 2}')) == {"z": 1, "a": 2}


@pytest.mark.parametrize(
    "data", [b"42", b'"text"', b"null", b"not json", b'{"a": 1', b"\xff{}", b"", b"[" * 100_000]
)
def test_pretty_json_is_none_for_anything_but_an_object_or_array(data):
    assert pretty_json(data) is None


def test_pretty_json_keeps_odd_strings_escaped():
    text = pretty_json(b'{"nul": "a\\u0000b", "lone": "\\ud800"}')
    assert "\x00" not in text
    text.encode("utf-8")
    assert json.loads(text) == {"nul": "a\x00b", "lone": "\ud800"}
