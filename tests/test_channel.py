"""The key-channel codec (SPEC §5): every message, every malformed field."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from tvdnet import ChannelError, channel
from tvdnet.core.channel import Ack, Error, Hello, Member, Members, Update, Welcome
from tvdnet.core.constants import CHANNEL_LIMIT
from tvdnet.core.scheme import Schedule

MEMBERS = (Member("vm-a", "127.0.0.1:7001"), Member("vm-b", "[::1]:7002"))
MESSAGES: list[channel.ChannelMessage] = [
    Hello("vm-a", 0),
    Hello("vm-a", 17),
    Welcome("tvd-1", "vm-a", Schedule(1700000000.5, 5.0, 100), MEMBERS),
    Update(3, {"vm-b": bytearray(b"p" * 32), "vm-c": bytearray(b"q" * 32)}),
    Ack(3, 2, ("vm-d",)),
    Members(MEMBERS),
    Error("early"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: channel.ChannelMessage) -> None:
    data = channel.encode(message)
    assert channel.decode(data) == message
    reader = channel.ChannelReader()
    assert list(reader.feed(data[:5])) == []
    assert list(reader.feed(data[5:])) == [message]


def test_the_wire_form_is_the_spec_map() -> None:
    wire = msgpack.unpackb(channel.encode(MESSAGES[2]))
    assert wire == {
        "type": "welcome", "v": 1, "tvd": "tvd-1", "vm": "vm-a", "epoch": 1700000000.5,
        "period_s": 5.0, "periods": 100,
        "members": [{"id": "vm-a", "addr": "127.0.0.1:7001"}, {"id": "vm-b", "addr": "[::1]:7002"}],
    }  # fmt: skip
    assert msgpack.unpackb(channel.encode(MESSAGES[3]))["partials"]["vm-b"] == b"p" * 32


def test_update_repr_hides_the_partial_keys() -> None:
    text = repr(MESSAGES[3])
    assert "ppp" not in text and "2 partial keys" in text


def test_update_erase_zeroes_the_partials() -> None:
    update = channel.decode(channel.encode(MESSAGES[3]))
    assert isinstance(update, Update)
    update.erase()
    assert all(p == bytearray(32) for p in update.partials.values())


def _wire(**fields: Any) -> bytes:
    return msgpack.packb(fields)


@pytest.mark.parametrize(
    ("fields", "reason", "detail"),
    [
        ({"type": "hello", "v": 2, "vm": "a", "have": 0}, "version", "version 2"),
        ({"type": "hello", "v": True, "vm": "a", "have": 0}, "version", "version True"),
        ({"type": "hello", "vm": "a", "have": 0}, "bad-message", "'v' is missing"),
        ({"type": "hello", "v": 1, "vm": "a b", "have": 0}, "bad-message", "hello.vm"),
        ({"type": "hello", "v": 1, "vm": "a", "have": -1}, "bad-message", "hello.have"),
        ({"type": "hello", "v": 1, "vm": "a", "have": 1.0}, "bad-message", "hello.have"),
        ({"type": "update", "t": 0, "partials": {}}, "bad-message", "update.t"),
        ({"type": "update", "t": -3, "partials": {}}, "bad-message", "update.t"),
        ({"type": "update", "t": 1, "partials": []}, "bad-message", "update.partials"),
        ({"type": "update", "t": 1, "partials": {"b": b"x" * 31}}, "bad-message", "32 bytes"),
        ({"type": "update", "t": 1, "partials": {"b": "x" * 32}}, "bad-message", "32 bytes"),
        ({"type": "update", "t": 1, "partials": {"b/": b"x" * 32}}, "bad-message", "key"),
        ({"type": "ack", "t": 1, "applied": 1}, "bad-message", "'missing' is missing"),
        ({"type": "ack", "t": 1, "applied": 1, "missing": "b"}, "bad-message", "ack.missing"),
        ({"type": "welcome", "v": 1, "tvd": "t", "vm": "a", "epoch": 0.0, "period_s": 0.0,
          "periods": 5, "members": []}, "bad-message", "period_s"),
        ({"type": "welcome", "v": 1, "tvd": "t", "vm": "a", "epoch": float("nan"),
          "period_s": 1.0, "periods": 5, "members": []}, "bad-message", "epoch"),
        ({"type": "welcome", "v": 1, "tvd": "t", "vm": "a", "epoch": 0.0, "period_s": 1.0,
          "periods": 0, "members": []}, "bad-message", "periods"),
        ({"type": "welcome", "v": 1, "tvd": "t", "vm": "a", "epoch": 0.0, "period_s": 1.0,
          "periods": 5, "members": [{"id": "b", "addr": "nohost"}]}, "bad-message", "addr"),
        ({"type": "members", "members": [{"id": "b", "addr": "h:1"}, {"id": "b", "addr": "h:2"}]},
         "bad-message", "twice"),
        ({"type": "members", "members": [{"id": "b", "addr": "h:0"}]}, "bad-message", "port"),
        ({"type": "members", "members": [{"id": "b", "addr": "::1:80"}]}, "bad-message", "IPv6"),
        ({"type": "members", "members": ["b"]}, "bad-message", "must be a map"),
        ({"type": "error", "reason": 5}, "bad-message", "error.reason"),
        ({"type": "launch"}, "bad-message", "unknown message type"),
        ({"kind": "hello"}, "bad-message", "unknown message type"),
    ],
)  # fmt: skip
def test_malformed_messages_are_typed_errors(
    fields: dict[str, Any], reason: str, detail: str
) -> None:
    with pytest.raises(ChannelError) as caught:
        channel.decode(_wire(**fields))
    assert caught.value.reason == reason
    assert detail in caught.value.detail


def test_a_partial_key_is_never_echoed_in_an_error() -> None:
    with pytest.raises(ChannelError) as caught:
        channel.decode(_wire(type="update", t=1, partials={"b": b"\xab" * 31}))
    assert "abab" not in str(caught.value) and "\\xab" not in str(caught.value)


def test_non_map_and_garbage_are_bad_messages() -> None:
    for data in (msgpack.packb([1, 2]), b"\xc1", msgpack.packb("hello")):
        with pytest.raises(ChannelError) as caught:
            list(channel.ChannelReader().feed(data))
        assert caught.value.reason == "bad-message"


def test_an_oversized_message_is_refused_before_it_is_complete() -> None:
    reader = channel.ChannelReader()
    header = b"\x81\xa4type\xc6" + (8 << 20).to_bytes(4, "big")
    assert list(reader.feed(header + bytes(CHANNEL_LIMIT - 20))) == []
    with pytest.raises(ChannelError, match="limit"):
        list(reader.feed(bytes(100)))
    # The reader was reset: a good message afterwards is read normally.
    assert list(reader.feed(channel.encode(Hello("vm-a")))) == [Hello("vm-a")]


def test_after_an_error_the_rest_of_the_input_is_discarded() -> None:
    reader = channel.ChannelReader()
    data = b"\xc1" + channel.encode(Hello("vm-a"))
    with pytest.raises(ChannelError):
        list(reader.feed(data))
    assert reader.buffered == 0
    assert list(reader.feed(channel.encode(Error("early")))) == [Error("early")]


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("[::1]:9", ("::1", 9)),
        ("node-a:65535", ("node-a", 65535)),
    ],
)
def test_parse_address(addr: str, expected: tuple[str, int]) -> None:
    assert channel.parse_address(addr) == expected


@pytest.mark.parametrize("addr", ["", ":80", "h:", "h:x", "h:70000", "::1:80", "[]:80", "a b:1"])
def test_parse_address_refuses(addr: str) -> None:
    with pytest.raises(ValueError):
        channel.parse_address(addr)
