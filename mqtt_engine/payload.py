"""Message payloads: how they are stored, previewed, hashed and read as JSON.

Payloads are kept byte-exact, whatever they hold (binary, NUL, invalid UTF-8). The history's
``payload`` column is an Odoo ``fields.Binary(attachment=False)``, and Odoo's convention for
those is that the column holds the *base64* of the bytes, not the bytes: :func:`to_column` and
:func:`from_column` convert, so rows written by the engine's SQL and by the ORM read the same.

Beside it, ``payload_preview`` (PostgreSQL ``text``) is a one-glance rendering from
:func:`preview`: the text itself when the payload is text, a hex dump of its start otherwise.
It never holds NUL (PostgreSQL refuses NUL in text) and never fails, whatever the bytes.

>>> preview(b"21.5")
'21.5'
>>> preview(bytes([0, 255, 16]))
'binary, 3 bytes: 00 ff 10'
>>> json_value(b'{"meta": {"msg_id": 42}}', "meta.msg_id")
'42'
>>> from_column(to_column(b"\\x00raw"))
b'\\x00raw'
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import json
import re

HEX_BYTES = 32
"""How many leading bytes the preview of a binary payload shows."""

# What makes a payload "not text" for the preview: controls other than tab, LF and CR.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

BytesLike = bytes | bytearray | memoryview


class PayloadError(ValueError):
    """A payload (or a stored column value) that cannot be read as asked; the message says why."""


def to_column(data: BytesLike | None) -> bytes | None:
    """The value to write in a ``Binary(attachment=False)`` column: base64, None when empty.

    Odoo itself stores an empty binary as NULL; the size column tells an empty payload apart.
    """
    if not data:
        return None
    return base64.b64encode(data)


def from_column(value: BytesLike | str | None) -> bytes:
    """The payload bytes from a column value (memoryview from psycopg2, bytes, or str).

    NULL (and Odoo's ``False``) read as ``b""``. Raises :class:`PayloadError` when the value is
    not base64, rather than returning bytes that were never the payload.
    """
    if not value:
        return b""
    try:
        raw = value.encode("ascii") if isinstance(value, str) else bytes(value)
        return base64.b64decode(b"".join(raw.split()), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise PayloadError(f"column value is not base64: {exc}") from None


def sha256_hex(data: BytesLike) -> str:
    """The SHA-256 of the payload bytes, as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def _size(count: int) -> str:
    return "1 byte" if count == 1 else f"{count:,} bytes"


def preview(data: BytesLike | None, limit: int = 500) -> str:
    """A short, safe rendering of a payload for lists and forms.

    The text itself when its first ``limit`` characters are UTF-8 text without control
    characters other than tab, newline and carriage return; cut there and followed by
    ``… (<size> bytes)`` when the payload is longer. Otherwise ``binary, <size> bytes:`` and the
    first 32 bytes in hex. Only a bounded prefix (4 bytes a character) is ever decoded, so a
    10 MiB payload costs no more than a small one, and a character cut by that prefix is not
    mistaken for invalid UTF-8.

    >>> preview("é".encode() * 3, limit=2)
    'éé… (6 bytes)'
    >>> preview(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(1000))  # doctest: +ELLIPSIS
    'binary, 1,008 bytes: 89 50 4e 47 0d 0a 1a 0a 00 00 ... 00 …'
    """
    limit = max(0, limit)
    if isinstance(data, bytes) and len(data) <= limit:  # the common case: short, done at once
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if not _CONTROL.search(text):
                return text
    view = memoryview(data if data is not None else b"").cast("B")
    size = view.nbytes
    budget = 4 * limit  # enough bytes for `limit` characters, whatever their width
    head = bytes(view[:budget])
    whole = size <= budget
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        text = decoder.decode(head, final=whole)
    except UnicodeDecodeError as exc:
        text = head[: exc.start].decode("utf-8")  # the valid part before the bad byte
        whole = False
    shown = text[:limit]
    is_text = (whole or len(shown) == limit) and not _CONTROL.search(shown)
    if is_text and whole and len(text) <= limit:
        return shown
    if is_text:
        return f"{shown}… ({_size(size)})"
    dump = view[:HEX_BYTES].hex(" ")
    return f"binary, {_size(size)}: {dump}{' …' if size > HEX_BYTES else ''}"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one, not one per message


def _load(data: BytesLike) -> object:
    """The payload parsed as strict JSON (UTF-8, no NaN or Infinity); :class:`PayloadError`."""
    raw = data if isinstance(data, bytes) else bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(
            f"payload is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at position {exc.start})"
        ) from None
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise PayloadError("payload is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, NaN, integers too long to convert
        raise PayloadError(f"payload is not valid JSON: {exc}") from None


def json_value(data: BytesLike, path: str) -> str:
    """The scalar at a dotted ``path`` of a JSON payload, as text (the dedup key's source).

    Keys are separated by dots (``meta.msg_id``); a decimal step indexes an array
    (``items.0.id``). Strings come back as they are, integers in decimal, booleans as
    ``true``/``false``. Raises :class:`PayloadError` when the payload is not JSON, the key is
    missing, or its value cannot identify a message: an object or array, ``null``, an empty
    string, or a string the database cannot store (NUL, lone surrogate).

    >>> json_value(b'{"items": [{"id": "a1"}]}', "items.0.id")
    'a1'
    """
    if not path:
        raise PayloadError("JSON key path is empty")
    value = _load(data)
    for key in path.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isascii() and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise PayloadError(f"JSON key {path!r} not found")
    if isinstance(value, dict):
        raise PayloadError(f"JSON key {path!r} holds an object, not a scalar")
    if isinstance(value, list):
        raise PayloadError(f"JSON key {path!r} holds an array, not a scalar")
    if value is None:
        raise PayloadError(f"JSON key {path!r} is null")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    assert isinstance(value, str)
    if not value:
        raise PayloadError(f"JSON key {path!r} holds an empty string")
    if "\x00" in value:
        raise PayloadError(f"JSON key {path!r} holds a string with a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError(
            f"JSON key {path!r} holds a string with a lone surrogate "
            f"(U+{ord(value[exc.start]):04X}), which is not text"
        ) from None
    return value


def pretty_json(data: BytesLike) -> str | None:
    """The payload as indented JSON when it is a JSON object or array, else None."""
    try:
        value = _load(data)
    except PayloadError:
        return None
    if not isinstance(value, (dict, list)):
        return None
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False)
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\\ud800" escape: keep it escaped
        text = json.dumps(value, indent=2)
    except RecursionError:
        return None
    return text
