"""Both ends of the key channel (SPEC §5), joined in memory: VmChannel and KeyAgent."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from device_bridge._vmchannel import Acked, ChannelState, NodeSaid, Refused, VmChannel
from helpers import SCHEDULE, Tvd, mid
from tvdnet import channel
from tvdnet.core.agent import (
    AgentState,
    ChannelRefused,
    KeyAgent,
    KeysUpdated,
    ScheduleMismatch,
    Welcomed,
)
from tvdnet.core.channel import Member
from tvdnet.core.scheme import Schedule

MEMBERS = (Member("vm-a", "127.0.0.1:7001"), Member("vm-b", "127.0.0.1:7002"))


def drain(source: Any) -> list[Any]:
    out = []
    while (event := source.next_event()) is not None:
        out.append(event)
    return out


class Wire:
    """A bridge-side VmChannel and a node-side KeyAgent for vm-a, joined in memory."""

    def __init__(self, schedule: Schedule = SCHEDULE, welcome_schedule: Schedule | None = None):
        self.tvd = Tvd(["vm-a", "vm-b", "vm-c"], schedule=schedule)
        self.session = self.tvd.session("vm-a")
        self.agent = KeyAgent(self.session, schedule)
        welcome = channel.Welcome(self.tvd.tvd, "vm-a", welcome_schedule or schedule, MEMBERS)
        self.bridge = VmChannel("vm-a", welcome)
        self.from_node: list[Any] = []
        self.from_bridge: list[Any] = []

    def update_for(self, t: int) -> bytes:
        return channel.encode(channel.Update(t, self.tvd.partials("vm-a", t)))

    def push(self, t: int, now: float) -> None:
        self.bridge.new_update(t, self.update_for(t), self.tvd.schedule.end(t), now)

    def pump(self, now: float) -> None:
        for _ in range(10):
            up = self.agent.data_to_send()
            down = self.bridge.data_to_send()
            if not up and not down:
                return
            self.from_node += list(channel.ChannelReader().feed(up))
            self.from_bridge += list(channel.ChannelReader().feed(down))
            self.bridge.receive_data(up, now)
            self.agent.receive_data(down, now)

    def connect(self, now: float) -> None:
        self.bridge.connection_made(now)
        self.agent.connection_made(now)
        self.pump(now)


def test_hello_welcome_update_ack() -> None:
    w = Wire()
    now = mid(3)
    w.push(3, now)
    w.connect(now)
    assert w.from_node[0] == channel.Hello("vm-a", 0)
    assert isinstance(w.from_bridge[0], channel.Welcome)
    assert isinstance(w.from_bridge[1], channel.Update)
    # vm-c's partial is ignored: the welcome does not list vm-c as a member.
    assert w.from_node[1] == channel.Ack(3, 1, ())
    assert w.session.key_state("vm-b").period == 3
    assert w.agent.state is AgentState.WELCOMED
    events = drain(w.bridge)
    assert [type(e) for e in events] == [Acked]
    assert events[0].t == 3
    assert w.bridge.acked == 3
    agent_events = drain(w.agent)
    assert isinstance(agent_events[0], Welcomed)
    assert agent_events[1] == KeysUpdated(3, 1, [])


def test_the_ack_names_members_without_a_computer_key() -> None:
    w = Wire()
    members = (*MEMBERS, Member("vm-d", "127.0.0.1:7004"))
    w.bridge.set_welcome(channel.Welcome(w.tvd.tvd, "vm-a", SCHEDULE, members))
    partials = w.tvd.partials("vm-a", 2)
    partials["vm-d"] = bytearray(b"d" * 32)
    w.bridge.new_update(2, channel.encode(channel.Update(2, partials)), SCHEDULE.end(2), mid(2))
    w.connect(mid(2))
    assert channel.Ack(2, 1, ("vm-d",)) in w.from_node
    assert Welcomed(members, ["vm-d"]) in drain(w.agent)


def test_a_hello_naming_another_vm_gets_wrong_vm_and_nothing_else() -> None:
    w = Wire()
    w.push(1, mid(1))
    w.bridge.connection_made(mid(1))
    w.bridge.receive_data(channel.encode(channel.Hello("vm-b", 0)), mid(1))
    assert list(channel.ChannelReader().feed(w.bridge.data_to_send())) == [
        channel.Error("wrong-vm")
    ]
    assert w.bridge.wants_disconnect
    assert drain(w.bridge) == [Refused("wrong-vm", "a hello naming another VM")]


def test_garbage_or_oversize_from_a_node_is_bad_message_and_disconnect() -> None:
    w = Wire()
    w.bridge.connection_made(0.0)
    w.bridge.receive_data(b"\xc1garbage", 0.0)
    assert list(channel.ChannelReader().feed(w.bridge.data_to_send())) == [
        channel.Error("bad-message")
    ]
    assert w.bridge.wants_disconnect
    w.bridge.connection_made(0.0)  # the VM may reconnect
    w.bridge.receive_data(b"\x81\xa4type\xc6" + (9 << 20).to_bytes(4, "big") + bytes(1 << 20), 0.0)
    assert w.bridge.wants_disconnect


def test_an_unacknowledged_update_is_resent_with_backoff_until_its_period_ends() -> None:
    w = Wire()
    start = SCHEDULE.start(2)
    w.push(2, start)
    w.bridge.connection_made(start)
    w.bridge.receive_data(channel.encode(channel.Hello("vm-a", 0)), start)
    sent_at = [start]
    w.bridge.data_to_send()
    now = start
    while True:
        now = w.bridge.next_deadline()
        if now == float("inf"):
            break
        w.bridge.handle_timeout(now)
        if w.bridge.data_to_send():
            sent_at.append(now)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(sent_at)]
    assert gaps == [1.0, 2.0, 4.0]  # then the period (10 s) ended: no more re-sends
    assert w.bridge.resends == 3


def test_an_early_update_gets_early_and_no_ack_then_applies_on_resend() -> None:
    w = Wire()
    start = SCHEDULE.start(4)
    bridge_clock = start
    node_clock = start - 3.0  # the node's clock is 3 s behind: more than the 2 s allowance
    w.push(4, bridge_clock)
    w.bridge.connection_made(bridge_clock)
    w.agent.connection_made(node_clock)
    w.pump(node_clock)
    assert channel.Error("early") in w.from_node
    assert not any(isinstance(m, channel.Ack) for m in w.from_node)
    assert NodeSaid("early") in drain(w.bridge)
    assert w.session.key_state("vm-b").period == 0
    # One second later the bridge re-sends; the node's clock is now within the allowance.
    w.bridge.handle_timeout(bridge_clock + 1.0)
    w.pump(node_clock + 1.0)
    assert channel.Ack(4, 1, ()) in w.from_node
    assert w.session.key_state("vm-b").period == 4


def test_old_stale_or_repeated_updates_are_acked_and_ignored() -> None:
    w = Wire()
    w.push(5, mid(5))
    w.connect(mid(5))
    key = w.session.key_state("vm-b").open_key()
    snapshot = bytes(key)
    for t in (5, 3):
        w.agent.receive_data(channel.encode(channel.Update(t, w.tvd.partials("vm-a", 5))), mid(5))
        assert w.agent.data_to_send()  # an ack
    assert bytes(w.session.key_state("vm-b").open_key()) == snapshot


def test_a_welcome_with_another_schedule_erases_keys_and_refuses() -> None:
    w = Wire()
    w.push(2, mid(2))
    w.connect(mid(2))
    key = w.session.key_state("vm-b").open_key()
    w.agent.connection_made(mid(2))
    other = channel.Welcome(w.tvd.tvd, "vm-a", Schedule(0.0, 11.0, 1000), MEMBERS)
    w.agent.receive_data(channel.encode(other), mid(2))
    assert channel.Error("schedule") in channel.ChannelReader().feed(w.agent.data_to_send())
    assert key == bytearray(32)
    assert w.session.key_state("vm-b").period == 0
    assert w.agent.state is AgentState.REFUSED
    assert any(isinstance(e, ScheduleMismatch) for e in drain(w.agent))
    # Updates from that bridge are not applied.
    w.agent.receive_data(w.update_for(2), mid(2))
    assert not w.session.key_state("vm-b").has_key


def test_the_bridge_stops_sending_to_a_node_that_refused_its_schedule() -> None:
    w = Wire(welcome_schedule=Schedule(0.0, 11.0, 1000))
    w.push(2, mid(2))
    w.connect(mid(2))
    assert w.bridge.state is ChannelState.REFUSED
    assert NodeSaid("schedule") in drain(w.bridge)
    w.bridge.handle_timeout(mid(2) + 1.0)
    assert w.bridge.data_to_send() == b""


def test_a_new_hello_after_an_ack_gets_the_current_update_again() -> None:
    w = Wire()
    w.push(2, mid(2))
    w.connect(mid(2))
    drain(w.bridge)
    # The node restarted: a new session, no keys.
    w.session = w.tvd.session("vm-a")
    w.agent = KeyAgent(w.session, SCHEDULE)
    w.connect(mid(2) + 1)
    assert w.session.key_state("vm-b").period == 2


def test_hellos_said_before_the_answer_is_written_get_one_answer() -> None:
    # A busy hub says hello again every second until it reads its welcome: the answers
    # still queued are superseded, not piled up (85 KB each for a 1,200-member hub).
    w = Wire()
    w.push(2, mid(2))
    w.bridge.connection_made(mid(2))
    hello = channel.encode(channel.Hello("vm-a", 0))
    for i in range(3):
        w.bridge.receive_data(hello, mid(2) + i)
    out = list(channel.ChannelReader().feed(w.bridge.data_to_send()))
    assert [type(m) for m in out] == [channel.Welcome, channel.Update]
    assert isinstance(out[1], channel.Update)
    assert out[1].t == 2
    # Once taken for writing, an answer is in flight: the next hello gets another.
    w.bridge.receive_data(hello, mid(2) + 3)
    again = list(channel.ChannelReader().feed(w.bridge.data_to_send()))
    assert [type(m) for m in again] == [channel.Welcome, channel.Update]


def test_a_hello_supersedes_a_queued_members_message_and_resend() -> None:
    w = Wire()
    w.push(2, mid(2))
    w.connect(mid(2))
    w.bridge.new_update(3, w.update_for(3), SCHEDULE.end(3), mid(3), members=MEMBERS[:1])
    w.bridge.receive_data(channel.encode(channel.Hello("vm-a", 2)), mid(3))
    out = list(channel.ChannelReader().feed(w.bridge.data_to_send()))
    assert [type(m) for m in out] == [channel.Welcome, channel.Update]
    assert isinstance(out[0], channel.Welcome) and isinstance(out[1], channel.Update)
    assert out[0].members == MEMBERS[:1]
    assert out[1].t == 3


def test_members_message_then_update() -> None:
    w = Wire()
    w.push(2, mid(2))
    w.connect(mid(2))
    w.bridge.new_update(3, w.update_for(3), SCHEDULE.end(3), mid(3), members=MEMBERS[:1])
    w.pump(mid(3))
    assert channel.Members(MEMBERS[:1]) in w.from_bridge
    assert w.session.peers == []
    with pytest.raises(Exception, match="vm-b"):
        w.session.key_state("vm-b")


def test_the_agent_says_hello_every_second_until_welcomed() -> None:
    w = Wire()
    w.agent.connection_made(0.0)
    hellos = [0.0]
    w.agent.data_to_send()
    for _ in range(3):
        now = w.agent.next_deadline()
        w.agent.handle_timeout(now)
        if w.agent.data_to_send():
            hellos.append(now)
    assert hellos == [0.0, 1.0, 2.0, 3.0]
    w.agent.connection_lost(3.5)
    assert w.agent.next_deadline() == 4.5


def test_a_welcomed_agent_asks_again_for_an_overdue_update() -> None:
    """Issue 19: after a live migration the guest's port may reach another host's bridge
    without the guest seeing a hang-up; that bridge waits for a hello. So an update that
    is 1 s overdue makes the agent say hello, every second until one comes."""
    w = Wire()
    now = mid(3)
    w.push(3, now)
    w.connect(now)
    assert w.agent.last_update == 3
    assert w.agent.next_deadline() == SCHEDULE.start(4) + 1.0  # nothing before it
    w.from_node.clear()
    # Period 4 begins; its update arrives in time: no hello.
    w.push(4, SCHEDULE.start(4) + 0.2)
    w.pump(SCHEDULE.start(4) + 0.2)
    assert w.from_node == [channel.Ack(4, 1, ())]
    assert w.agent.next_deadline() == SCHEDULE.start(5) + 1.0
    # Period 5's never comes over this connection (the host end changed silently).
    hellos = []
    for _ in range(3):
        at = w.agent.next_deadline()
        w.agent.handle_timeout(at)
        hellos += [(at, m) for m in channel.ChannelReader().feed(w.agent.data_to_send())]
    start = SCHEDULE.start(5)
    assert hellos == [(start + s, channel.Hello("vm-a", 4)) for s in (1.0, 2.0, 3.0)]
    # The new bridge answers a hello with a welcome and the current update: quiet again.
    w.bridge = VmChannel("vm-a", w.bridge._welcome)
    w.push(5, start + 3.0)
    w.bridge.connection_made(start + 3.0)
    w.bridge.receive_data(channel.encode(channel.Hello("vm-a", 4)), start + 3.0)
    w.pump(start + 3.0)
    assert w.agent.last_update == 5
    assert w.agent.next_deadline() == SCHEDULE.start(6) + 1.0


def test_no_update_is_asked_for_after_the_last_period() -> None:
    schedule = Schedule(0.0, 10.0, 3)
    w = Wire(schedule)
    w.push(3, mid(3, schedule))
    w.connect(mid(3, schedule))
    assert w.agent.last_update == 3
    assert w.agent.next_deadline() == float("inf")


def test_an_answer_arriving_slowly_postpones_the_next_hello() -> None:
    w = Wire()
    w.push(2, mid(2))
    w.bridge.connection_made(mid(2))
    w.agent.connection_made(mid(2))
    w.bridge.receive_data(w.agent.data_to_send(), mid(2))
    answer = w.bridge.data_to_send()
    # The welcome trickles in over 1.5 s: no second hello while bytes keep coming.
    w.agent.receive_data(answer[:10], mid(2) + 0.9)
    assert w.agent.next_deadline() == pytest.approx(mid(2) + 1.9)
    w.agent.handle_timeout(mid(2) + 1.5)
    assert w.agent.data_to_send() == b""
    w.agent.receive_data(answer[10:], mid(2) + 1.5)
    assert w.agent.state is AgentState.WELCOMED
    assert w.session.key_state("vm-b").period == 2
    # Silence after a partial answer: the hello is said again 1 s after the last byte.
    w.agent.connection_made(mid(2) + 2)
    w.agent.data_to_send()
    w.agent.receive_data(answer[:10], mid(2) + 2.5)
    w.agent.handle_timeout(mid(2) + 3.5)
    assert list(channel.ChannelReader().feed(w.agent.data_to_send())) == [channel.Hello("vm-a", 2)]


def test_garbage_from_the_bridge_is_refused_and_the_agent_says_hello_again() -> None:
    w = Wire()
    w.connect(mid(1))
    w.agent.receive_data(b"\xc1", mid(1))
    out = list(channel.ChannelReader().feed(w.agent.data_to_send()))
    assert out == [channel.Error("bad-message"), channel.Hello("vm-a", 0)]
    assert any(isinstance(e, ChannelRefused) for e in drain(w.agent))


def test_an_update_past_the_last_period_is_refused() -> None:
    w = Wire(schedule=Schedule(0.0, 10.0, 3))
    w.connect(5.0)
    update = channel.Update(4, {"vm-b": bytearray(32)})
    w.agent.receive_data(channel.encode(update), 5.0)
    assert channel.Error("bad-message") in channel.ChannelReader().feed(w.agent.data_to_send())


def test_approach_one_holds_an_early_image_until_its_period_starts() -> None:
    w = Wire()
    image = w.update_for(6)
    now = SCHEDULE.start(6) - 5.0
    w.agent.apply_image(image, now)
    assert w.session.key_state("vm-b").period == 0
    assert w.agent.next_deadline() == SCHEDULE.start(6) - 2.0
    w.agent.handle_timeout(SCHEDULE.start(6) - 2.0)
    assert w.session.key_state("vm-b").period == 6
    assert w.agent.data_to_send() == b""  # approach I has no acknowledgement
    w.agent.apply_image(b"\xc1", now)
    assert any(isinstance(e, ChannelRefused) for e in drain(w.agent))
