"""
The UDP channel: frames over UDP beside a TLS link, while UDP works.

A VPN whose frames ride TCP collapses on a lossy, long line: the inner
TCP connections and the outer one both retransmit and both back off (TCP
over TCP).  So, as SoftEther's UDP acceleration does, a card and its hub
open a UDP channel beside each TLS link and move frames over it while it
works; the TLS link stays for the handshake, for control, and as the
fallback the moment UDP stops working.  Nothing here is crypto of its
own: the keys come from the TLS session (RFC 5705 exporter), the AEAD
from C{cryptography} (L{sevpn.datagram}).

A channel is an L{ILink} of the session, subordinate to its TLS link:

 - it is created when the hub's welcome offers UDP (the port and a
   channel id; L{sevpn.wire.Welcome}) and ends with its TLS link;
 - while it is I{up} the session uses it first (L{Session.use_link} with
   nothing to resend: the TLS link carries what is in flight), and frames
   go over UDP, still numbered and kept in the send log until
   acknowledged, so a resume after the TLS link breaks resends exactly
   what the peer lacks; a datagram lost on the line is a frame lost as on
   a wire (the inner TCP recovers; the receiver counts the gap);
 - while it is I{probing} or I{down} frames go over the TLS link;
 - C{say_goodbye}, C{fail} and C{when_closed} act on the TLS link.

Liveness.  The card probes the hub's UDP port (L{wire.Probe}): at once,
then every second while it probes, while frames flow, or while a probe is
unanswered, and every L{IDLE_PROBE_INTERVAL} seconds when idle.  Its side
is up once an answer authenticates (only an answer shows that the hub
hears the card too: UDP may work one way only), and down when a probe
stays unanswered for L{DOWN_AFTER} seconds.  Its probes say whether it
hears the hub; the hub's side is up while the card says so, and down when
the card says otherwise (over UDP, or over TLS when its side went down:
a PROBE on the TLS stream), when what it sent got no word back within
L{QUIET_AFTER}, or after L{SILENCE_LIMIT} seconds of silence.  The hub
learns where the card is only from authentic datagrams: the address
follows the newest (a card behind NAT, roaming).

When it carries.  Every frame over UDP is a datagram of its own, sealed
and opened in Python, so on a clean fast line TCP (64 KiB super-frames
whole) moves several times more; on a lossy line UDP is what keeps the
inner TCP alive.  So a channel that works stands by (I{ready}) while its
TLS link's TCP shows a clean line, and carries (I{joining}, I{up}) once
that TCP retransmits more than a few segments in a thousand
(L{sevpn.lossmeter}) — on trial: a line whose loss comes from TCP filling
its queue moves more over TCP, so after L{sevpn.lossmeter.TRIAL} seconds
a channel whose UDP moved clearly less hands the frames back to TCP and
does not try again for a while.  After L{STICKY} seconds of carrying it
hands them back to TCP to measure the line again.  Mode C{always} carries whenever UDP
works.

The channel's life is an Automat machine (the table is at the end of
L{DatagramLink}): probing -> ready -> joining -> up -> ready ..., down
when UDP stops working, and closed.  I{Joining}, the session's frames wait (a second at most) until
the peer acknowledged every frame that went over TLS, so that none sent
over UDP overtakes one still on its way over TCP: the receiver would count
it lost, and a resume would not bring it back.

Size.  A datagram fits a 1500-byte path (L{sevpn.datagram.room}); a card
clamps the MSS of the TCP SYNs crossing it (L{sevpn.mss}) so that inner
TCP segments fit, and while the channel is up a super-frame (an offload
frame of up to 64 KiB) is cut into segments before it is numbered
(L{sevpn.offload.to_plain}).  A frame that still does not fit crosses in
one datagram that IP fragments.

The I/O is injected: the hub's channels share one UDP port
(L{HubChannels}, fed by L{sevpn.udp}); a card's channel has a socket of
its own.  Time comes from the clock.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from automat import MethodicalMachine
from twisted.logger import Logger
from zope.interface import Interface, implementer

from sevpn import datagram, mss, offload as vnet, tls, wire
from sevpn.acking import AckPolicy
from sevpn.lossmeter import SAMPLE_INTERVAL, CarryPolicy
from sevpn.sequencing import SequenceError
from sevpn.session import ILink, IShaper, Session
from sevpn.timing import TokenBucket

#: Seconds between probes while probing, while frames flow, or while one is unanswered.
PROBE_INTERVAL = 1.0
#: Seconds between probes of an idle channel that is up (NAT mappings last longer).
IDLE_PROBE_INTERVAL = 5.0
#: A card's probe unanswered this long means its side is down: three
#: probes or answers lost in a row (it probes every second while it waits).
DOWN_AFTER = 3.0
#: The hub's side is down when it sent a card datagrams and heard nothing
#: back for this long (a card that receives probes within a second).
QUIET_AFTER = 2.0
#: Probing or down this long, a card probes every L{IDLE_PROBE_INTERVAL} only.
SLOW_PROBING_AFTER = 10.0
#: The hub's side goes down after this long without a word from the card.
SILENCE_LIMIT = IDLE_PROBE_INTERVAL + DOWN_AFTER + 1.0
#: Probe answers a hub's channel sends a second at most (bursts of as many).
ANSWER_RATE = 10.0
#: Direction of the keys: the card seals with the first, the hub with the second.
CARD_TO_HUB, HUB_TO_CARD = 0, 1
#: Plaintext bytes a DATA message's header takes in a datagram.
_DATA_HEADER = wire.HEADER_SIZE + 16

#: Joining, frames wait at most this long (and this many bytes) for what
#: went over TLS to be acknowledged; the peer is asked for its ack every
#: L{JOIN_STEP} seconds meanwhile.
JOIN_TIMEOUT = 1.0
JOIN_LIMIT = 1 << 20
JOIN_STEP = 0.1

PROBING, READY, JOINING, UP, DOWN, OFF = "probing", "ready", "joining", "up", "down", "off"
#: When the channel carries: while the line is lossy (L{sevpn.lossmeter}), or always.
AUTO, ALWAYS = "auto", "always"
#: Carrying since this long, an C{auto} channel hands the frames back to
#: TCP to see whether the line is clean again.
STICKY = 300.0


def _mbps(rate: Optional[float]) -> str:
    """Bytes a second as the Mbit/s a user reads."""
    return f"{(rate or 0.0) * 8 / 1e6:.1f} Mbit/s"


class ChannelStatus:
    """A session's UDP channel as status shows it: its state, and counters summed over its channels."""

    def __init__(self) -> None:
        self.state = OFF
        self.peer: Optional[str] = None
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bad = 0
        self.replayed = 0
        self.send_errors = 0
        #: Frames that could not cross: a bad super-frame, or too large for any datagram.
        self.dropped = 0
        self.ups = 0
        self.rtt: Optional[float] = None
        #: Asked before the state is shown (the hub's side notices silence lazily).
        self.refresh: Optional[Callable[[], None]] = None

    def counters(self) -> dict:
        if self.refresh is not None:
            self.refresh()
        return {
            "udp": self.state,
            "udp_peer": self.peer,
            "udp_datagrams_in": self.datagrams_in,
            "udp_datagrams_out": self.datagrams_out,
            "udp_bad": self.bad,
            "udp_replayed": self.replayed,
            "udp_send_errors": self.send_errors,
            "udp_dropped": self.dropped,
            "udp_ups": self.ups,
            "udp_rtt_ms": round(self.rtt * 1000, 1) if self.rtt is not None else None,
        }


class IDatagramTransport(Interface):
    """Where a channel's datagrams go (L{sevpn.udp} has the real ones)."""

    def send(datagram, address) -> bool:
        """Send one datagram to C{address} (a connected socket ignores it); False if it could not."""

    def close() -> None:
        """Stop: no more sending or reading."""


def family(host: str) -> int:
    """4 or 6: the IP version of an address as text."""
    return 6 if ":" in host and not host.startswith("::ffff:") else 4


def derive_keys(link, channel_id: int) -> Optional[datagram.Derive]:
    """
    The epoch keys of a channel beside C{link} (see L{sevpn.datagram}), or
    None if its TLS session exports none.
    """
    transport = link.transport

    def derive(epoch: int) -> Tuple[bytes, bytes]:
        material = tls.keying_material(transport, datagram.LABEL, 2 * datagram.KEY_SIZE,
                                       datagram.context(channel_id, epoch))
        if material is None:
            raise datagram.KeysUnavailable("the TLS session exports no keying material")
        return datagram.split_keys(material)

    try:
        derive(0)
    except datagram.KeysUnavailable:
        return None
    return derive


@implementer(ILink, IShaper)
class DatagramLink:
    """
    One UDP channel beside a TLS link: an L{ILink} of its session while it
    is up.  The two roles differ in liveness only (L{CardChannel},
    L{HubChannel}); see the module docstring.
    """

    _machine = MethodicalMachine()
    log = Logger()

    #: Which keys this end seals with (the other opens with the other).
    direction = CARD_TO_HUB

    def __init__(
        self, link, session: Session, clock, channel_id: int, derive: datagram.Derive,
        transport: IDatagramTransport, room: int, offload: bool, clamp: Optional[Tuple[int, int]] = None,
        mode: str = AUTO,
    ) -> None:
        self.link = link
        #: C{auto}: carry while the line is lossy; C{always}: whenever UDP works.
        self.mode = mode
        #: When an C{auto} channel carries: a lossy line, and UDP not slower on trial.
        self.policy = CarryPolicy()
        self.session = session
        self.clock = clock
        self.id = channel_id
        self.transport = transport
        self.sealer = datagram.Sealer(channel_id, derive, self.direction)
        self.opener = datagram.Opener(channel_id, derive, 1 - self.direction)
        #: Plaintext bytes per datagram that cross without IP fragmentation.
        self.room = room
        self.offload = offload
        self.clamp = clamp
        self.acks = AckPolicy(clock, self._delivered, self.send_ack)
        #: Where datagrams go (the hub learns it; a card's socket is connected).
        self.peer: Optional[tuple] = None
        self.state = PROBING
        self.status = session.udp if session.udp is not None else ChannelStatus()
        session.udp = self.status
        self.status.state = PROBING
        self._heard_at: Optional[float] = None
        self._state_since = clock.seconds()
        #: Joining: frames held (first number, payload), their bytes, the
        #: last frame that went over TLS, and the timer that asks for acks.
        self._held: List[Tuple[int, bytes]] = []
        self._held_bytes = 0
        self._mark = 0
        self._join_call = None
        self._answers = TokenBucket(ANSWER_RATE, ANSWER_RATE, clock.seconds())
        session.shaper = self
        self._measure_call = clock.callLater(SAMPLE_INTERVAL, self._measure)

    # when to carry -----------------------------------------------------------

    def _measure(self) -> None:
        """
        Ready, read the TLS link's TCP counters: a lossy line makes the
        channel carry, on trial.  Carrying, end the trial (UDP stays, or
        it was slower and TCP carries again), or after L{STICKY} seconds
        give the frames back to TCP to measure the line again.
        """
        self._measure_call = self.clock.callLater(SAMPLE_INTERVAL, self._measure)
        now = self.clock.seconds()
        if self.state == READY:
            if self.mode == ALWAYS:
                self.lossy()
                return
            counters = self.link.tcp_counters()
            if counters is not None and self.policy.tcp_sample(now, *counters, self.session.bytes_out):
                self.lossy()
        elif self.state in (JOINING, UP) and self.mode == AUTO:
            verdict = self.policy.udp_sample(now, self.session.bytes_out)
            if verdict is False:
                self.slower(self.policy.udp_rate, self.policy.tcp_rate)
            elif verdict:
                self.log.info("{peer}: UDP moves {udp} against TCP's {tcp} before: UDP carries on",
                              peer=self.describe_peer(), udp=_mbps(self.policy.udp_rate),
                              tcp=_mbps(self.policy.tcp_rate))
            elif now - self._state_since >= STICKY:
                self.clean()

    def works(self) -> None:
        """UDP was heard working both ways: the channel is ready (and carries at once if always)."""
        if self.state not in (READY, JOINING, UP):
            self.answered()
            if self.mode == ALWAYS and self.state == READY:
                self.lossy()

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {self.id:016x} {self.state}>"

    # ILink ---------------------------------------------------------------------

    def send_data(self, first_seq: int, payload: bytes) -> None:
        """Frames numbered from C{first_seq}, in as many datagrams as they need."""
        if self.state == JOINING:
            self._held.append((first_seq, payload))
            self._held_bytes += len(payload)
            if self._held_bytes > JOIN_LIMIT:
                self.drained()
            return
        why = self.stale()
        if why is not None:
            self.silent(why)
            link = self.session.link
            if link is not None:
                link.send_data(first_seq, payload)
            return
        ack = self.acks.note()
        view = memoryview(payload)
        header = wire.data_header
        for index, start, stop in datagram.data_runs(view, self.room - _DATA_HEADER):
            self._send(header(first_seq + index, ack, stop - start) + view[start:stop], wire.DATA)

    def pause_reading(self) -> None:
        """A UDP port cannot push back: a full destination drops (and counts) instead."""

    def resume_reading(self) -> None:
        pass

    def say_goodbye(self, reason: str) -> None:
        self.link.say_goodbye(reason)

    def fail(self, reason: str) -> None:
        self.link.fail(reason)

    def when_closed(self):
        return self.link.when_closed()

    # IShaper: frames on their way through the session ----------------------------

    def outgoing(self, frames: Sequence) -> Sequence:
        """
        L{IShaper.outgoing}: clamp the MSS of the TCP SYNs going out (a card's
        channel), and while the channel is up cut super-frames too large for
        one datagram into plain segments, so that they need no IP fragmentation.
        """
        clamp = self.clamp
        if clamp is not None:
            offset = vnet.HEADER_SIZE if self.offload else 0
            frames = [mss.clamp(f, offset, *clamp) for f in frames]
        if self.state != UP:
            return frames
        limit = self.room - _DATA_HEADER - 4
        if all(len(f) <= limit for f in frames):
            return frames
        fitted: List = []
        for frame in frames:
            if len(frame) <= limit or not self.offload or not frame[1] & ~vnet.GSO_ECN:
                fitted.append(frame)  # not a super-frame: IP fragments what is too large
                continue
            try:
                segments = vnet.to_plain(frame)
            except vnet.BadFrame:
                self.status.dropped += 1
                continue
            fitted.extend(vnet.from_plain(s) for s in segments)
        return fitted

    def incoming(self, frames: Sequence) -> Sequence:
        """
        L{IShaper.incoming}: clamp the MSS of the TCP SYNs coming in (a card's
        channel), so that the segments the card's side sends fit a datagram too.
        """
        clamp = self.clamp
        if clamp is None:
            return frames
        offset = vnet.HEADER_SIZE if self.offload else 0
        return [mss.clamp(f, offset, *clamp) for f in frames]

    # datagrams -------------------------------------------------------------------

    def _send(self, plaintext, kind: int) -> None:
        if self.state == OFF:
            return
        try:
            sealed = self.sealer.seal(plaintext)
        except datagram.SealerExhausted:
            self.close("the channel used up its counters")
            return
        except ValueError:
            self.status.dropped += 1
            return
        if self.transport.send(sealed, self.peer):
            self.status.datagrams_out += 1
            self.sent(kind)
        else:
            self.status.send_errors += 1

    def send_ack(self) -> None:
        # Only while up: an ACK says "I hear you" to the hub, and the TLS
        # link's DATA and keepalives carry the (cumulative) ack anyway.
        if self.state == UP:
            self._send(wire.encode_ack(self.acks.note()), wire.ACK)

    def _delivered(self) -> int:
        return self.session.delivered

    def datagram_received(self, data, address) -> bool:
        """
        A datagram for this channel arrived from C{address}: True if it was
        authentic and new (then L{read_done} follows the read), else it was
        dropped and counted.
        """
        if self.state == OFF:
            return False
        opener = self.opener
        bad, replayed = opener.bad, opener.replayed + opener.too_old
        plaintext = opener.open(data)
        if plaintext is None:
            self.status.bad += opener.bad - bad
            self.status.replayed += opener.replayed + opener.too_old - replayed
            return False
        self.status.datagrams_in += 1
        self._heard_at = self.clock.seconds()
        probe = None
        try:
            kind, body = wire.decode_datagram(plaintext)
            if kind == wire.DATA:
                first, ack, frames = wire.decode_data(body)
                self.session.data_received(first, ack, frames, len(body) - 16 - 4 * len(frames))
                self.acks.arrived(len(frames), len(body))
            elif kind == wire.ACK:
                self.session.ack_received(wire.decode_ack(body))
            else:
                probe = wire.Probe.decode(body)
                self.session.ack_received(probe.ack)
        except (wire.ProtocolError, SequenceError) as e:
            self.fail(f"the UDP channel carried a bad message: {e}")
            return False
        self.heard(address, kind, probe)
        return True

    def read_done(self) -> None:
        """Every datagram of one read was handled: deliver, and acknowledge in time."""
        if self.state != OFF:
            self.session.input_done()
            self.acks.settle()

    def answer(self, probe: wire.Probe) -> None:
        """Answer a probe (a few a second at most): the answer carries our ack."""
        if self._answers.take(self.clock.seconds()):
            self._send(wire.Probe(self.acks.note(), probe.token, reply=True,
                                  hearing=self.state in (READY, JOINING, UP)).encode(), wire.PROBE)

    # joining: no frame over UDP may overtake one that went over TLS -------------

    def check_drained(self) -> None:
        """Joining, and the peer acknowledged every frame that went over TLS: carry."""
        if self.state == JOINING and self.session.sent.acked >= self._mark:
            self.drained()

    def _join_step(self) -> None:
        self._join_call = None
        if self.state != JOINING:
            return
        if self.clock.seconds() - self._state_since >= JOIN_TIMEOUT:
            self.drained()
            return
        self._join_call = self.clock.callLater(JOIN_STEP, self._join_step)
        self.solicit()

    def _stop_join_timer(self) -> None:
        if self._join_call is not None and self._join_call.active():
            self._join_call.cancel()
        self._join_call = None

    # the roles' part -------------------------------------------------------------

    def heard(self, address, kind: int, probe: Optional[wire.Probe]) -> None:
        """An authentic datagram of C{kind} arrived (C{probe}, if it was one)."""
        raise NotImplementedError

    def solicit(self) -> None:
        """Joining: ask the peer for its ack (a probe; its answer carries it)."""
        raise NotImplementedError

    def stale(self) -> Optional[str]:
        """Why the channel is down though no input said so yet, or None."""
        return None

    def sent(self, kind: int) -> None:
        """A datagram carrying a message of C{kind} went out."""

    def describe_peer(self) -> str:
        raise NotImplementedError

    def carrying(self, on: bool) -> None:
        """The session sends over this channel now (C{on}), or no longer."""

    def went_down(self) -> None:
        """The channel was up and is down now."""

    def _ended(self) -> None:
        """The channel closed: the role lets go of what it holds."""

    # the machine -------------------------------------------------------------------

    @_machine.state(initial=True)
    def probing(self):
        """Not heard yet: frames go over TCP."""

    @_machine.state()
    def ready(self):
        """UDP works both ways, but the line is clean: frames stay on TCP, the channel stands by."""

    @_machine.state()
    def joining(self):
        """
        UDP works both ways; the session's frames wait here until the peer
        acknowledged every frame that went over TLS, so that none sent over
        UDP overtakes one still on its way over TCP (the receiver would
        count it lost).
        """

    @_machine.state()
    def up(self):
        """UDP works both ways: the session sends over it first."""

    @_machine.state()
    def down(self):
        """UDP stopped working: frames go over TCP; probing goes on."""

    @_machine.state()
    def closed(self):
        """The TLS link is gone (or the channel ended): nothing more."""

    @_machine.input()
    def answered(self):
        """Something authentic arrived, and the peer hears us."""

    @_machine.input()
    def peer_deaf(self, why: str):
        """Something authentic arrived, but the peer says it hears nothing from us."""

    @_machine.input()
    def silent(self, why: str):
        """Liveness ran out: C{why}."""

    @_machine.input()
    def close(self, reason: str):
        """The channel ends (its TLS link is gone)."""

    @_machine.input()
    def drained(self):
        """Joining: what went over TLS is acknowledged (or the wait is over)."""

    @_machine.input()
    def lossy(self):
        """The line is lossy (or the mode is always): carry."""

    @_machine.input()
    def clean(self):
        """Carried long enough: give the frames back to TCP and measure the line again."""

    @_machine.input()
    def slower(self, udp_rate: float, tcp_rate: float):
        """On trial, UDP moved clearly less than TCP did before (bytes a second): back to TCP for a while."""

    @_machine.output()
    def _stand_by(self) -> None:
        self._enter(READY)
        self.policy.restart()
        self.log.info("{peer}: UDP channel ready: frames go over UDP once the line loses packets",
                      peer=self.describe_peer())

    @_machine.output()
    def _note_down(self, why: str) -> None:
        self._enter(DOWN)
        self.log.warn("{peer}: UDP channel down ({why}): frames stay on TCP", peer=self.describe_peer(), why=why)

    @_machine.output()
    def _back_to_tcp(self) -> None:
        self._to_tcp()
        self.log.info("{peer}: frames back on TCP, to see whether the line is clean again",
                      peer=self.describe_peer())

    @_machine.output()
    def _give_back(self, udp_rate: float, tcp_rate: float) -> None:
        self._to_tcp()
        self.log.info("{peer}: UDP moved {udp} against TCP's {tcp}: frames back on TCP, the faster here",
                      peer=self.describe_peer(), udp=_mbps(udp_rate), tcp=_mbps(tcp_rate))

    def _to_tcp(self) -> None:
        """Stop carrying: what waits goes over TLS, and the line is measured afresh."""
        self._stop_join_timer()
        self._enter(READY)
        self.policy.restart()
        self.session.stop_using_link(self)
        self.carrying(False)
        self._release_held()

    @_machine.output()
    def _join(self) -> None:
        self._enter(JOINING)
        self._mark = self.session.sent.next_seq - 1
        self._held, self._held_bytes = [], 0
        self.policy.carrying(self.clock.seconds(), self.session.bytes_out)
        self.session.use_link(self, None)
        self.carrying(True)
        self._join_call = self.clock.callLater(JOIN_STEP, self._join_step)

    @_machine.output()
    def _carry(self) -> None:
        self._stop_join_timer()
        self._enter(UP)
        self.status.ups += 1
        held, self._held, self._held_bytes = self._held, [], 0
        for first, payload in held:
            self.send_data(first, payload)
        self.log.info("{peer}: UDP channel up: frames go over UDP", peer=self.describe_peer())

    @_machine.output()
    def _unjoin(self, why: str) -> None:
        self._stop_join_timer()
        self._enter(DOWN)
        self.session.stop_using_link(self)
        self.carrying(False)
        self._release_held()
        self.went_down()
        self.log.warn("{peer}: UDP channel down ({why}): frames stay on TCP", peer=self.describe_peer(), why=why)

    def _release_held(self) -> None:
        """Frames held while joining go over the link now first (TLS), if any."""
        held, self._held, self._held_bytes = self._held, [], 0
        link = self.session.link
        if link is not None:
            for first, payload in held:
                link.send_data(first, payload)

    @_machine.output()
    def _stop_joining(self) -> None:
        self._stop_join_timer()
        self.session.stop_using_link(self)
        self.carrying(False)
        self._release_held()  # a TLS link gone takes them along: a resume resends them

    @_machine.output()
    def _uncarry(self, why: str) -> None:
        self._enter(DOWN)
        self.session.stop_using_link(self)
        self.carrying(False)
        self.went_down()
        self.log.warn("{peer}: UDP channel down ({why}): frames go over TCP", peer=self.describe_peer(), why=why)

    @_machine.output()
    def _note_blocked(self, why: str) -> None:
        self._enter(DOWN)
        self.log.warn("{peer}: no answer over UDP ({why}; blocked?): frames stay on TCP, probing goes on",
                      peer=self.describe_peer(), why=why)

    @_machine.output()
    def _stop_carrying(self) -> None:
        self.session.stop_using_link(self)
        self.carrying(False)

    @_machine.output()
    def _end(self) -> None:
        if self._measure_call is not None and self._measure_call.active():
            self._measure_call.cancel()
        self._measure_call = None
        self._enter(OFF)
        self.acks.stop()
        if self.session.shaper is self:
            self.session.shaper = None
        self._ended()

    @_machine.output()
    def _ignore(self) -> None:
        pass

    def _enter(self, state: str) -> None:
        self.state = self.status.state = state
        self._state_since = self.clock.seconds()

    probing.upon(answered, enter=ready, outputs=[_stand_by])
    probing.upon(peer_deaf, enter=probing, outputs=[_ignore])
    probing.upon(silent, enter=down, outputs=[_note_blocked])
    probing.upon(close, enter=closed, outputs=[_end])
    probing.upon(drained, enter=probing, outputs=[_ignore])
    probing.upon(lossy, enter=probing, outputs=[_ignore])
    probing.upon(clean, enter=probing, outputs=[_ignore])

    ready.upon(lossy, enter=joining, outputs=[_join])
    ready.upon(clean, enter=ready, outputs=[_ignore])
    ready.upon(answered, enter=ready, outputs=[_ignore])
    ready.upon(peer_deaf, enter=down, outputs=[_note_down])
    ready.upon(silent, enter=down, outputs=[_note_down])
    ready.upon(close, enter=closed, outputs=[_end])
    ready.upon(drained, enter=ready, outputs=[_ignore])

    joining.upon(drained, enter=up, outputs=[_carry])
    joining.upon(answered, enter=joining, outputs=[_ignore])
    joining.upon(peer_deaf, enter=down, outputs=[_unjoin])
    joining.upon(silent, enter=down, outputs=[_unjoin])
    joining.upon(close, enter=closed, outputs=[_stop_joining, _end])
    joining.upon(lossy, enter=joining, outputs=[_ignore])
    joining.upon(clean, enter=ready, outputs=[_back_to_tcp])
    joining.upon(slower, enter=ready, outputs=[_give_back])

    up.upon(answered, enter=up, outputs=[_ignore])
    up.upon(peer_deaf, enter=down, outputs=[_uncarry])
    up.upon(silent, enter=down, outputs=[_uncarry])
    up.upon(close, enter=closed, outputs=[_stop_carrying, _end])
    up.upon(drained, enter=up, outputs=[_ignore])
    up.upon(lossy, enter=up, outputs=[_ignore])
    up.upon(clean, enter=ready, outputs=[_back_to_tcp])
    up.upon(slower, enter=ready, outputs=[_give_back])

    down.upon(answered, enter=ready, outputs=[_stand_by])
    down.upon(peer_deaf, enter=down, outputs=[_ignore])
    down.upon(silent, enter=down, outputs=[_ignore])
    down.upon(close, enter=closed, outputs=[_end])
    down.upon(drained, enter=down, outputs=[_ignore])
    down.upon(lossy, enter=down, outputs=[_ignore])
    down.upon(clean, enter=down, outputs=[_ignore])

    closed.upon(answered, enter=closed, outputs=[_ignore])
    closed.upon(peer_deaf, enter=closed, outputs=[_ignore])
    closed.upon(silent, enter=closed, outputs=[_ignore])
    closed.upon(close, enter=closed, outputs=[_ignore])
    closed.upon(drained, enter=closed, outputs=[_ignore])
    closed.upon(lossy, enter=closed, outputs=[_ignore])
    closed.upon(clean, enter=closed, outputs=[_ignore])


class CardChannel(DatagramLink):
    """
    The card's end: its own socket toward the hub's UDP port; it probes,
    and decides its side's liveness by the answers.
    """

    direction = CARD_TO_HUB

    def __init__(self, *args, hub: str = "hub", small_frames: Optional[Callable[[bool], None]] = None,
                 **kw) -> None:
        super().__init__(*args, **kw)
        self.hub = hub
        self.small_frames = small_frames
        self._busy = False
        self._token = 0
        self._probed_at: Optional[float] = None
        #: When the first probe since the last authentic arrival went out.
        self._unanswered_since: Optional[float] = None
        self.status.peer = hub
        self._tick_call = self.clock.callLater(PROBE_INTERVAL, self._tick)
        self._probe()

    def describe_peer(self) -> str:
        return f"hub {self.hub}"

    def _probe(self) -> None:
        now = self.clock.seconds()
        self._token += 1
        self._probed_at = now
        if self._unanswered_since is None:
            self._unanswered_since = now
        self._send(wire.Probe(self.acks.note(), self._token, hearing=self.state in (READY, JOINING, UP)).encode(),
                   wire.PROBE)

    def _tick(self) -> None:
        self._tick_call = self.clock.callLater(PROBE_INTERVAL, self._tick)
        now = self.clock.seconds()
        busy, self._busy = self._busy, False
        waiting = self._unanswered_since
        if waiting is not None and now - waiting >= DOWN_AFTER:
            self.silent(f"nothing from the hub for {now - waiting:.0f} s")
        since_probe = now - self._probed_at
        if self.state in (READY, JOINING, UP):
            due = busy or waiting is not None or since_probe >= IDLE_PROBE_INTERVAL
        else:
            due = now - self._state_since < SLOW_PROBING_AFTER or since_probe >= IDLE_PROBE_INTERVAL
        if due:
            self._probe()

    def sent(self, kind: int) -> None:
        if kind != wire.PROBE:
            self._busy = True

    def heard(self, address, kind: int, probe: Optional[wire.Probe]) -> None:
        """
        Note the hub's datagram: answer its probe; only the answer to our own
        probe shows the hub hears us too, which times the round trip and makes
        the channel ready.
        """
        if kind == wire.DATA:
            self._busy = True
        if probe is not None and not probe.reply:
            self.answer(probe)  # a joining hub asks for our ack
        # Only an answer shows the hub hears us too: UDP may work one way
        # only, and the hub sends while it believes the channel is up.
        if probe is None or not probe.reply:
            self.check_drained()
            return
        self._unanswered_since = None
        if probe.token == self._token and self._probed_at is not None:
            self.status.rtt = self.clock.seconds() - self._probed_at
        if self.state not in (READY, JOINING, UP):
            self.works()
            self._probe()  # tell the hub at once that we hear it
        self.check_drained()

    def solicit(self) -> None:
        self._probe()

    def carrying(self, on: bool) -> None:
        if self.small_frames is not None:
            self.small_frames(on)

    def went_down(self) -> None:
        # The hub may still believe in the channel and send into it: tell it
        # over TLS, the way that works (a PROBE saying we hear nothing).
        self.link.send_message(wire.Probe(self.acks.note(), 0, hearing=False))

    def _ended(self) -> None:
        self._stop_join_timer()
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None
        self.transport.close()


class HubChannel(DatagramLink):
    """
    The hub's end: one of the channels on the hub's UDP port
    (L{HubChannels}).  It answers probes, follows the card's address, and
    is up while the card says it hears the hub.
    """

    direction = HUB_TO_CARD

    def __init__(self, *args, table: "HubChannels", name: str = "", **kw) -> None:
        super().__init__(*args, **kw)
        self.table = table
        self.name = name
        self._token = 0
        self.status.refresh = self.check
        #: When the first datagram since the card's last word went out (answers aside).
        self._unanswered_since: Optional[float] = None
        self.moves = 0

    @property
    def port(self) -> int:
        """The hub's UDP port, as the welcome names it."""
        return self.table.port

    def describe_peer(self) -> str:
        return f"session {self.name}"

    def heard(self, address, kind: int, probe: Optional[wire.Probe]) -> None:
        """
        Note the card's datagram: follow the card's address if it moved, answer
        its probe, and go down if it says it hears nothing, else count the
        channel as working (the card sends only while it hears the hub).
        """
        self._unanswered_since = None
        if address != self.peer:
            if self.peer is not None:
                self.moves += 1
                if self.moves == 1:
                    self.log.info("{peer}: the card's UDP address moved to {address}",
                                  peer=self.describe_peer(), address=format_address(address))
            self.peer = address
            self.status.peer = format_address(address)
        if probe is not None and not probe.reply:
            self.answer(probe)
        if probe is not None and not probe.hearing:
            self.peer_deaf("the card hears nothing from the hub")
        elif self.state not in (READY, JOINING, UP):
            # A card sends DATA and ACK only while it hears the hub.  (The
            # machine's input is not cheap: it is given only when the
            # state would change.)
            self.works()
        self.check_drained()

    def solicit(self) -> None:
        self._token += 1
        self._send(wire.Probe(self.acks.note(), self._token, hearing=True).encode(), wire.PROBE)

    def sent(self, kind: int) -> None:
        if kind != wire.PROBE and self._unanswered_since is None:  # an answer expects no word back
            self._unanswered_since = self.clock.seconds()

    def stale(self) -> Optional[str]:
        """
        While up: down after L{SILENCE_LIMIT} seconds of silence from the card,
        or when it said nothing L{QUIET_AFTER} seconds after datagrams went to it.
        """
        if self.state != UP:
            return None
        now = self.clock.seconds()
        if self._heard_at is not None and now - self._heard_at >= SILENCE_LIMIT:
            return f"nothing from the card for {now - self._heard_at:.0f} s"
        waiting = self._unanswered_since
        if waiting is not None and now - waiting >= QUIET_AFTER:
            return f"no word from the card {now - waiting:.0f} s after datagrams went to it"
        return None

    def told_over_tls(self, probe: wire.Probe) -> None:
        """The card's PROBE came over the TLS link: it hears nothing over UDP (that it hears, only UDP can show)."""
        if not probe.hearing:
            self.peer_deaf("the card hears nothing over UDP, it says over TCP")

    def check(self) -> None:
        """Go down now if liveness ran out (status asks before it shows the state)."""
        why = self.stale()
        if why is not None:
            self.silent(why)

    def _ended(self) -> None:
        if self.status.refresh == self.check:
            self.status.refresh = None
        self.table.forget(self)


def format_address(address) -> str:
    """A socket address as C{host:port} (C{[v6]:port}); IPv4-mapped addresses as IPv4."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class HubChannels:
    """
    The hub's UDP port: every session's channel, found by its id.

    Unknown ids are dropped and counted (never logged per datagram); a
    source whose datagrams fail authentication faster than L{BAD_RATE} a
    second is ignored for L{BAD_PENALTY} seconds before any crypto is
    spent on it; every table is bounded.

    @param port: the UDP port number the welcome names.
    """

    log = Logger()

    #: Failed datagrams a source may send a second (bursts of L{BAD_BURST}).
    BAD_RATE = 20.0
    BAD_BURST = 100
    BAD_PENALTY = 10.0
    MAX_SOURCES = 4096

    def __init__(self, clock, port: int, max_channels: int = 8192,
                 random: Callable[[int], bytes] = os.urandom, mode: str = AUTO) -> None:
        self.clock = clock
        self.port = port
        #: When the channels carry (L{AUTO} or L{ALWAYS}).
        self.mode = mode
        self.max_channels = max_channels
        self.random = random
        #: Where datagrams go out: set when the socket is bound (L{sevpn.udp}).
        self.transport: Optional[IDatagramTransport] = None
        self._channels: Dict[int, HubChannel] = {}
        self._touched: Dict[int, HubChannel] = {}
        self._sources: Dict = {}
        self.unknown = 0
        self.throttled = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._channels)

    def open(self, link, session, name: str, offload: bool) -> Optional[HubChannel]:
        """A channel for a card's new TLS link, or None if there can be none (counted)."""
        if self.transport is None or len(self._channels) >= self.max_channels:
            self.refused += 1
            return None
        while True:
            channel_id = int.from_bytes(self.random(8), "big")
            if channel_id and channel_id not in self._channels:
                break
        derive = derive_keys(link, channel_id)
        if derive is None:
            self.refused += 1
            return None
        host = getattr(getattr(link.transport, "getPeer", lambda: None)(), "host", "") or ""
        channel = HubChannel(
            link, session, self.clock, channel_id, derive, self.transport,
            datagram.room(family(str(host))), offload, table=self, name=name, mode=self.mode,
        )
        self._channels[channel_id] = channel
        return channel

    def forget(self, channel: HubChannel) -> None:
        if self._channels.get(channel.id) is channel:
            del self._channels[channel.id]
        self._touched.pop(channel.id, None)

    # the socket's receiver

    def datagram_received(self, data, address) -> None:
        """
        A datagram on the hub's UDP port: to its channel by id (unknown ids are
        counted); a source in its penalty is dropped before any crypto, and one
        whose datagrams fail authentication is charged for it.
        """
        channel_id = datagram.channel_of(data)
        channel = self._channels.get(channel_id) if channel_id is not None else None
        if channel is None:
            self.unknown += 1
            return
        host = address[0] if isinstance(address, tuple) else address
        source = self._sources.get(host)
        now = self.clock.seconds()
        if source is not None and source[1] > now:
            self.throttled += 1
            return
        bad = channel.opener.bad
        if channel.datagram_received(data, address):
            self._touched[channel_id] = channel
        elif channel.opener.bad > bad:
            self._failed(host, now)

    def _failed(self, host, now: float) -> None:
        source = self._sources.get(host)
        if source is None:
            if len(self._sources) >= self.MAX_SOURCES:
                self._sources.pop(next(iter(self._sources)))
            source = self._sources[host] = [TokenBucket(self.BAD_RATE, self.BAD_BURST, now), 0.0]
        if not source[0].take(now):
            source[1] = now + self.BAD_PENALTY
            self.log.warn("ignoring UDP from {host} for {t:g} s: too many datagrams that fail authentication",
                          host=host, t=self.BAD_PENALTY)

    def read_done(self) -> None:
        touched, self._touched = self._touched, {}
        for channel in touched.values():
            channel.read_done()

    def counters(self) -> dict:
        return {
            "udp_channels": len(self._channels),
            "udp_unknown_channel": self.unknown,
            "udp_throttled": self.throttled,
            "udp_refused": self.refused,
        }


def open_card_channel(link, session: Session, welcome: wire.Welcome, connect: Callable, clock,
                      offload: bool, small_frames: Optional[Callable[[bool], None]] = None,
                      mode: str = AUTO) -> Optional[CardChannel]:
    """
    The card's channel beside C{link}, as the hub's C{welcome} offers it,
    or None (logged) when it cannot be had.

    @param connect: C{connect(host, port, receiver) -> IDatagramTransport},
        a socket toward the hub whose datagrams go to C{receiver}.
    @param small_frames: told C{True} while the channel carries the frames
        and C{False} after (the card's TAP segments TCP then).
    """
    host = link.peer_address()
    derive = derive_keys(link, welcome.udp_channel)
    if derive is None:
        DatagramLink.log.warn("no UDP channel: the TLS session exports no keys ({why})",
                              why=tls.EXPORTER_MISSING or "not TLS")
        return None
    room = datagram.room(family(host))
    holder: List[CardChannel] = []
    forward = _Forward(holder)
    try:
        transport = connect(host, welcome.udp_port, forward)
    except OSError as e:
        DatagramLink.log.warn("no UDP channel to {host}: {why}", host=host, why=e.strerror or str(e))
        return None
    channel = CardChannel(
        link, session, clock, welcome.udp_channel, derive, transport, room, offload,
        clamp=mss.limits(room), hub=format_address((host, welcome.udp_port)), small_frames=small_frames,
        mode=mode,
    )
    holder.append(channel)
    return channel


class _Forward:
    """A card socket's receiver until (and after) its channel exists."""

    def __init__(self, holder: list) -> None:
        self.holder = holder

    def datagram_received(self, data, address) -> None:
        if self.holder:
            self.holder[0].datagram_received(data, address)

    def read_done(self) -> None:
        if self.holder:
            self.holder[0].read_done()
