"""The inbox between the network thread and the writer: bounded, ordered, prompt to wake."""

from __future__ import annotations

import threading

from mqtt_engine.ingest import Inbox
from mqtt_engine.session import InboundMessage

from .support import hold_for, wait_for


def _message(number: int, size: int = 10) -> InboundMessage:
    return InboundMessage(
        topic="t", payload=bytes(size), qos=1, retain=False, dup=False, mid=number, connection=1
    )


def _in_thread(function, *args) -> list:
    """Start ``function(*args)`` in a thread; the list returned receives its result."""
    results: list = []
    threading.Thread(target=lambda: results.append(function(*args)), daemon=True).start()
    return results


def _put_all(inbox: Inbox, messages: list[InboundMessage]) -> list[bool]:
    return [inbox.put(message) for message in messages]


def test_a_full_inbox_holds_the_producer_until_the_writer_takes():
    inbox = Inbox(max_messages=3, max_bytes=10**6)
    done = _in_thread(_put_all, inbox, [_message(n) for n in range(1, 6)])
    wait_for(lambda: len(inbox) == 3, what="three messages queued")
    hold_for(lambda: len(inbox) == 3 and not done, 0.3, "the fourth waits for room")

    assert [m.mid for m in inbox.take(10, window=0, idle=0)] == [1, 2, 3]
    wait_for(lambda: done, what="the producer to finish once there was room")
    assert done == [[True] * 5]
    assert [m.mid for m in inbox.take(10, window=0, idle=0)] == [4, 5]


def test_the_byte_bound_holds_too_but_one_large_message_always_fits():
    inbox = Inbox(max_messages=100, max_bytes=250)
    assert inbox.put(_message(1, size=1000))  # alone, above the bound: accepted
    assert [m.mid for m in inbox.take(1, window=0, idle=0)] == [1]

    assert _put_all(inbox, [_message(2, size=100), _message(3, size=100)]) == [True, True]
    done = _in_thread(_put_all, inbox, [_message(4, size=100)])  # 300 > 250
    hold_for(lambda: len(inbox) == 2 and not done, 0.3, "the third 100 bytes wait")
    assert [m.mid for m in inbox.take(10, window=0, idle=0)] == [2, 3]
    wait_for(lambda: done == [[True]], what="room after the take")
    assert [m.mid for m in inbox.take(10, window=0, idle=0)] == [4]


def test_a_waiting_writer_wakes_on_the_first_message_not_at_its_timeout():
    inbox = Inbox(max_messages=100, max_bytes=10**6)
    batches = _in_thread(inbox.take, 100, 0.0, 120.0)
    wait_for(lambda: inbox._wanted == 1, what="the writer to wait")
    inbox.put(_message(7))
    wait_for(lambda: batches, timeout=10, what="the writer to take the message")
    assert [m.mid for m in batches[0]] == [7]


def test_a_full_batch_ends_the_window_early():
    inbox = Inbox(max_messages=100, max_bytes=10**6)
    inbox.put(_message(1))
    batches = _in_thread(inbox.take, 4, 120.0, 120.0)
    wait_for(lambda: inbox._wanted == 4, what="the writer to wait for a full batch")
    for n in (2, 3, 4, 5):
        inbox.put(_message(n))
    wait_for(lambda: batches, timeout=10, what="the batch of four")
    assert [m.mid for m in batches[0]] == [1, 2, 3, 4]
    assert len(inbox) == 1


def test_an_inbox_full_by_bytes_ends_the_window_early():
    inbox = Inbox(max_messages=100, max_bytes=250)
    assert _put_all(inbox, [_message(1, size=100), _message(2, size=100)]) == [True, True]
    batches = _in_thread(inbox.take, 10, 120.0, 120.0)
    wait_for(lambda: inbox._wanted == 10, what="the writer to wait for a full batch")
    done = _in_thread(_put_all, inbox, [_message(3, size=100)])  # 300 > 250: waits for room
    wait_for(lambda: batches, timeout=10, what="the writer to take what there is")
    assert [m.mid for m in batches[0]] == [1, 2]
    wait_for(lambda: done == [[True]], what="room for the third")
    assert [m.mid for m in inbox.take(10, window=0, idle=0)] == [3]


def test_closing_releases_a_waiting_producer_and_refuses_more():
    inbox = Inbox(max_messages=1, max_bytes=10**6)
    inbox.put(_message(1))
    done = _in_thread(_put_all, inbox, [_message(2)])
    hold_for(lambda: not done, 0.3, "the second message waits for room")
    inbox.close()
    wait_for(lambda: done, what="the producer to be released")
    assert done == [[False]]
    assert inbox.put(_message(3)) is False
    assert inbox.clear() == 1
