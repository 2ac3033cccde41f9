"""
The virtual LAN card's policy: its life on a real line.

A card joins its I{LAN side} to a virtual hub over a session: for a
virtual LAN card the LAN side is its TAP device (what the OS sees as a
network card, joined by a L{sevpn.port.Cable}); for a cascade it is the
local hub's virtual hub, which dials the remote one as a card would.  Its
life is an Automat state machine (the transition table is at the end of
L{Card}):

 - I{disconnected}: the cable is unplugged (no carrier), nothing is dialled;
 - I{connecting}: dialling the hub, retrying forever with
   L{sevpn.timing.Backoff}; still no carrier;
 - I{connected}: the hub welcomed the card: carrier up, frames flow;
 - I{resuming}: the link broke without a goodbye: the carrier stays up, the
   OS's frames are held, and the card redials to take its session back
   within the resume window, losing nothing;
 - I{refused}: the hub said no (wrong password, ...): no retrying until
   the user connects again.

The card dials by itself (a reconnecting client on the injected clock), so
every retry, give-up and timer is a transition of this machine rather than
of a service hidden underneath.  I/O is injected: the LAN side
(L{ILanSide}) and C{endpoint_for(account)}.
"""

from __future__ import annotations

from typing import Callable, FrozenSet, Optional

from automat import MethodicalMachine
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from sevpn import defaults, wire
from sevpn.accounts import Account
from sevpn.link import Link, describe_failure
from sevpn.mac import format_mac
from sevpn.port import Cable, Port, SessionPort
from sevpn.sequencing import DEFAULT_LIMIT
from sevpn.session import Session
from sevpn.timing import Backoff, Keepalive

DISCONNECTED = "disconnected"
CONNECTING = "connecting"
CONNECTED = "connected"
RESUMING = "resuming"
REFUSED = "refused"


class ILanSide(Interface):
    """What a card joins to the hub: its TAP, or a local virtual hub."""

    name = Attribute("What it is, for status.")
    offload = Attribute("Whether it takes kernel offload super-frames (asked for in the hello).")
    carrier = Attribute("Whether the cable shows as plugged in.")

    def set_carrier(on: bool) -> None:
        """Show the cable plugged in or not."""

    def plug(port: Port) -> None:
        """A session's port: frames now flow between it and the LAN side."""

    def unplug() -> None:
        """The session is gone: the port is closed, what the LAN sends is dropped."""

    def counters() -> dict:
        """The LAN side's counters, for status."""


@implementer(ILanSide)
class NicSide:
    """A virtual LAN card's LAN side: its TAP port and the cable to the session."""

    def __init__(self, tap: Port) -> None:
        self.tap = tap
        self.cable = Cable(tap)

    @property
    def name(self) -> str:
        """The TAP device's name."""
        return self.tap.name

    @property
    def offload(self) -> bool:
        """Whether the TAP hands over offload super-frames."""
        return bool(self.tap.mac_offset)

    @property
    def carrier(self) -> bool:
        """Whether the OS sees the cable plugged in."""
        return self.tap.carrier

    def set_carrier(self, on: bool) -> None:
        """Show the cable plugged in or not (TUNSETCARRIER)."""
        self.tap.set_carrier(on)

    def plug(self, port: Port) -> None:
        """The session's port on the other end of the TAP's cable."""
        self.cable.plug(port)

    def unplug(self) -> None:
        """The session is gone: the cable hangs loose."""
        self.cable.unplug()

    def prefer_small_frames(self, on: bool) -> None:
        """A UDP channel carries the frames (C{on}): let the kernel segment TCP (L{TapPort.segment_in_kernel})."""
        self.tap.segment_in_kernel(on)

    def counters(self) -> dict:
        """The TAP's counters and what arrived while unplugged."""
        info = self.tap.counters()
        info["unplugged_drops"] = self.cable.unplugged_drops
        return info


class CardSession(Session):
    """The card's side of a session with the hub, and its port toward it."""

    def __init__(self, card: "Card", welcome: wire.Welcome) -> None:
        super().__init__(card.buffer_limit)
        self.id = welcome.session
        self.token = welcome.token
        self.started = card.clock.seconds()
        offload = wire.FEATURE_OFFLOAD in welcome.features
        self.port = SessionPort("uplink", self, card.clock, mac_offset=10 if offload else 0)

    def resume_request(self) -> wire.Resume:
        """The hello's request to take this session back."""
        return wire.Resume(self.id, self.token, self.delivered)


class Card:
    """
    A virtual LAN card: see the module docstring.

    @param clock: the reactor (C{callLater}, C{seconds}).
    @param lan: the LAN side (L{ILanSide}).
    @param endpoint_for: C{account -> IStreamClientEndpoint}; raises a
        L{sevpn.users.StateError} with a sentence if the account is unusable.
    @param features: more features to ask for in the hello (a cascade's).
    @param udp: opens a UDP socket toward the hub for the UDP channel
        (L{sevpn.channel}); None turns the channel off.
    """

    _machine = MethodicalMachine()
    log = Logger()

    def __init__(
        self,
        clock,
        lan: ILanSide,
        mac: bytes,
        endpoint_for: Callable[[Account], object],
        keepalive: Optional[Keepalive] = None,
        resume_window: float = defaults.RESUME_WINDOW,
        buffer_limit: int = DEFAULT_LIMIT,
        backoff: Optional[Callable[[int], float]] = None,
        features: FrozenSet[str] = frozenset(),
        udp: Optional[Callable] = None,
        udp_mode: str = "auto",
    ) -> None:
        self.clock = clock
        self.features = frozenset(features)
        #: C{udp(host, port, receiver)}: a datagram socket toward the hub
        #: (L{sevpn.udp.connect}), or None: no UDP channel.
        self.udp = udp
        #: When the UDP channel carries: C{auto} (while the line is lossy) or C{always}.
        self.udp_mode = udp_mode
        self.lan = lan
        self.mac = mac
        self.endpoint_for = endpoint_for
        self.keepalive = keepalive or Keepalive()
        self.resume_window = resume_window
        self.buffer_limit = buffer_limit
        self.backoff = backoff or Backoff()
        self.account: Optional[Account] = None
        self.session: Optional[CardSession] = None
        self.last_error: Optional[str] = None
        self.connected_since: Optional[float] = None
        self.reconnects = 0
        self.attempts = 0
        self.failures = 0
        #: The current connection attempt; events of older ones are stale.
        self._attempt: Optional[object] = None
        self._dialing: Optional[Deferred] = None
        self._retry_call = None
        self._window_call = None
        self._link: Optional[Link] = None
        #: Which of the account's hub addresses is dialled (they are tried in turn).
        self._node = 0
        #: The link of the current attempt while it waits for the hub's answer.
        self._handshaking: Optional[Link] = None
        self._waiters = []

    @property
    def offload(self) -> bool:
        """Whether the LAN side hands over offload super-frames."""
        return bool(self.lan.offload)

    @property
    def address(self) -> str:
        """The hub address dialled now (the account may list several nodes)."""
        if self.account is None:
            return ""
        return self.account.nodes[self._node % len(self.account.nodes)][0]

    @property
    def state(self) -> str:
        """The machine's state, as its name."""
        return self._state_name()

    @_machine.serializer()
    def _state_name(self, state):
        return state

    # the user's side -------------------------------------------------------

    def connect(self, account: Account) -> None:
        """Dial C{account} and keep it connected (raises if it is unusable)."""
        endpoints = self.endpoint_for(account)  # a sentence if unusable
        self._endpoints = list(endpoints) if isinstance(endpoints, (list, tuple)) else [endpoints]
        self._connect(account)

    def disconnect(self, reason: str = "disconnected by the user") -> Deferred:
        """Unplug the cable: goodbye to the hub, no retrying, no resume."""
        link = self._link
        self._disconnect(reason)
        return link.when_closed() if link is not None else succeed(None)

    def when_settled(self) -> Deferred:
        """Fires with the state once the card is connected, refused or disconnected."""
        if self.state in (CONNECTED, REFUSED, DISCONNECTED):
            return succeed(self.state)
        d = Deferred()
        self._waiters.append(d)
        return d

    # the link's side ---------------------------------------------------------

    def hello(self) -> wire.Hello:
        """The hello for the account dialled now (with a resume request when a session is held)."""
        account = self.account
        return wire.Hello(
            hub=account.hub_name,
            user=account.user,
            password=account.password,
            mac=format_mac(self.mac),
            features=self._features(),
            resume=self.session.resume_request() if self.session is not None else None,
        )

    def _features(self) -> frozenset:
        features = set(self.features) | ({wire.FEATURE_OFFLOAD} if self.offload else set())
        # Through a proxy, UDP would go around it: the user chose the proxy's path.
        if self.udp is not None and not self.account.proxy:
            features.add(wire.FEATURE_UDP)
        return frozenset(features)

    def _open_channel(self, link: Link, welcome: wire.Welcome) -> None:
        """A UDP channel beside C{link}, if the hub offered one."""
        if self.udp is None or wire.FEATURE_UDP not in welcome.features or self.account.proxy:
            return
        from sevpn.channel import open_card_channel

        # A LAN side with TCP super-frames (a TAP) has them cut by its kernel
        # while the channel carries; one without (a cascade's hub) has none.
        small_frames = getattr(self.lan, "prefer_small_frames", None)
        link.channel = open_card_channel(link, self.session, welcome, self.udp, self.clock,
                                         bool(self.session.port.mac_offset), small_frames, mode=self.udp_mode)

    def is_current(self, attempt: object) -> bool:
        """Whether C{attempt} is the connection attempt in progress."""
        return attempt is self._attempt

    def hub_answered(self, link: Link, attempt: object, answer) -> None:
        """The hub's WELCOME or REFUSED reached C{link}."""
        if attempt is not self._attempt:
            link.say_goodbye("superseded by a newer connection")
            return
        self._handshaking = None
        if isinstance(answer, wire.Refused):
            if answer.retry_later:
                link.reason = answer.message  # an outage: this attempt failed
                return
            self._refused(answer)
            return
        session = self.session
        if answer.resumed and session is not None and answer.session == session.id:
            if not session.can_resume_from(answer.received):
                link.fail("the hub's welcome says it received frames this card never sent")
                return
            self._resumed(link, answer)
        else:
            self._welcomed(link, answer)

    def link_connected(self, link: Link, attempt: object) -> None:
        """C{link} of C{attempt} is connected and says hello."""
        if attempt is self._attempt:
            self._handshaking = link

    def attempt_ended(self, attempt: object, reason: str) -> None:
        """A connection attempt ended before the hub's welcome."""
        if attempt is not self._attempt:
            return
        self._dialing = None
        self._handshaking = None
        self.failures += 1
        if self.account is not None and not self.account.auto_reconnect:
            self._give_up(reason)
        else:
            self._attempt_failed(reason)  # logged with the node that failed; the retry comes later
        self._node += 1  # the next node of the hub, if it has several

    def link_lost(self, link: Link, clean: bool, reason: str) -> None:
        """The session's link is gone; C{clean} if a goodbye was said."""
        if link is not self._link:
            return
        self._link = None
        self.reconnects += 1
        if self.account is not None and not self.account.auto_reconnect:
            self._give_up(reason)
        elif clean or self.resume_window <= 0:
            self._session_closed(reason)
        else:
            self._link_broke(reason)

    # the machine -------------------------------------------------------------

    @_machine.state(initial=True, serialized=DISCONNECTED)
    def disconnected(self):
        """Cable unplugged; nothing is dialled."""

    @_machine.state(serialized=CONNECTING)
    def connecting(self):
        """Dialling the hub (and redialling after failures); no carrier."""

    @_machine.state(serialized=CONNECTED)
    def connected(self):
        """Welcomed: carrier up, frames flow."""

    @_machine.state(serialized=RESUMING)
    def resuming(self):
        """The link broke: carrier up, frames held, redialling to resume."""

    @_machine.state(serialized=REFUSED)
    def refused(self):
        """The hub said no: waiting for the user."""

    @_machine.input()
    def _connect(self, account: Account):
        "The user connects with C{account}."

    @_machine.input()
    def _disconnect(self, reason: str):
        "The user (or shutdown) unplugs the cable."

    @_machine.input()
    def _welcomed(self, link: Link, welcome: wire.Welcome):
        "The hub welcomed the card into a fresh session."

    @_machine.input()
    def _resumed(self, link: Link, welcome: wire.Welcome):
        "The hub gave the card its held session back."

    @_machine.input()
    def _refused(self, refused: wire.Refused):
        "The hub refused the card for good."

    @_machine.input()
    def _attempt_failed(self, reason: str):
        "A connection attempt ended before a welcome."

    @_machine.input()
    def _give_up(self, reason: str):
        "A failure, and the account says not to reconnect."

    @_machine.input()
    def _link_broke(self, reason: str):
        "The link went without a goodbye: the session may resume."

    @_machine.input()
    def _session_closed(self, reason: str):
        "The hub ended the session with a goodbye."

    @_machine.input()
    def _window_passed(self):
        "The resume window passed without a resume."

    # outputs

    @_machine.output()
    def _goodbye_to_switch(self, account: Account) -> None:
        self._goodbye(f"the card switches to account {account.name}")

    @_machine.output()
    def _goodbye_to_leave(self, reason: str) -> None:
        self._goodbye(reason)

    def _goodbye(self, reason: str) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.say_goodbye(reason)

    @_machine.output()
    def _start(self, account: Account) -> None:
        self.account = account
        self._node = 0
        self.last_error = None
        self.attempts = 0
        self.failures = 0
        self.log.info(
            "connecting to hub {hub} at {addr} as user {user}{through}",
            hub=account.hub_name, addr=account.hubs_text, user=account.user,
            through=f" through the proxy {account.public()['proxy']}" if account.proxy else "",
        )
        self._dial()

    @_machine.output()
    def _stop_dialing(self) -> None:
        self._attempt = None
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        dialing, self._dialing = self._dialing, None
        if dialing is not None:
            dialing.cancel()
        link, self._handshaking = self._handshaking, None
        if link is not None:
            link.say_goodbye("the card stopped this attempt")

    @_machine.output()
    def _end_session(self) -> None:
        self._unplug()

    def _unplug(self) -> None:
        self._cancel_window()
        self.session = None
        self.lan.unplug()
        self.connected_since = None
        if self.lan.carrier:
            self.lan.set_carrier(False)

    @_machine.output()
    def _log_unplugged(self, reason: str) -> None:
        self.log.info("{reason}: cable unplugged", reason=reason)

    @_machine.output()
    def _log_gave_up(self, reason: str) -> None:
        self.last_error = reason
        self.log.warn(
            "{reason}; automatic reconnection is off for this account: cable unplugged", reason=reason
        )

    @_machine.output()
    def _new_session(self, link: Link, welcome: wire.Welcome) -> None:
        session = self.session = CardSession(self, welcome)
        self.lan.plug(session.port)
        self._attach(link, 0)
        self._open_channel(link, welcome)
        self.lan.set_carrier(True)
        self.connected_since = self.clock.seconds()
        self.log.info(
            "connected to hub {hub} at {addr} as {user}: cable plugged in",
            hub=self.account.hub_name, addr=self.address, user=self.account.user,
        )

    @_machine.output()
    def _log_lost_session(self, link: Link, welcome: wire.Welcome) -> None:
        self.log.info("the hub no longer had our session (it restarted or the window passed); starting a fresh one")

    @_machine.output()
    def _end_old_session(self, link: Link, welcome: wire.Welcome) -> None:
        self._unplug()

    @_machine.output()
    def _take_back(self, link: Link, welcome: wire.Welcome) -> None:
        self._cancel_window()
        session = self.session
        resent_before = session.sent.retransmitted
        session.resumes += 1
        self._attach(link, welcome.received)
        self._open_channel(link, welcome)
        self.log.info(
            "resumed session with hub {hub} at {addr}: {n} frames resent, nothing lost",
            hub=self.account.hub_name, addr=self.address, n=session.sent.retransmitted - resent_before,
        )

    def _attach(self, link: Link, peer_received: int) -> None:
        self._link = link
        self._dialing = None
        self.last_error = None
        self.failures = 0
        link.established(self.session, peer_received)

    @_machine.output()
    def _log_refused(self, refused: wire.Refused) -> None:
        message = refused.message
        if refused.code == wire.Refusal.AUTH_FAILED and self.account.cert_file:
            message += (f" (this card logs in with the certificate {self.account.cert_file}: the hub may not have "
                        f"it for user {self.account.user}, or revoked it)")
        self.last_error = f"the hub refused the connection: {message}"
        self.log.error(
            "hub {hub} at {addr} refused user {user}: {message}; not retrying until you connect again",
            hub=self.account.hub_name, addr=self.address, user=self.account.user,
            message=message,
        )

    @_machine.output()
    def _note_failure(self, reason: str) -> None:
        if reason != self.last_error:
            self.last_error = reason
            self.log.warn("cannot connect to hub {addr}: {reason}; retrying", addr=self.address, reason=reason)

    @_machine.output()
    def _retry_later(self, reason: str) -> None:
        self._retry_call = self.clock.callLater(self.backoff(self.failures + 1), self._retry_due)

    def _retry_due(self) -> None:
        self._retry_call = None
        self._dial()

    @_machine.output()
    def _log_broke(self, reason: str) -> None:
        self.last_error = reason
        self.log.warn(
            "lost the link to hub {addr} ({reason}); holding frames and resuming within {w:g} s",
            addr=self.address, reason=reason, w=self.resume_window,
        )

    @_machine.output()
    def _open_window(self, reason: str) -> None:
        self._cancel_window()
        self._window_call = self.clock.callLater(self.resume_window, self._window_due)

    def _window_due(self) -> None:
        self._window_call = None
        self._window_passed()

    def _cancel_window(self) -> None:
        if self._window_call is not None and self._window_call.active():
            self._window_call.cancel()
        self._window_call = None

    @_machine.output()
    def _redial(self) -> None:
        self.failures = 0
        self._dial()

    @_machine.output()
    def _log_closed(self, reason: str) -> None:
        self.log.info("hub {addr} closed the session ({reason}); reconnecting", addr=self.address, reason=reason)

    @_machine.output()
    def _log_window_passed(self) -> None:
        self.log.warn(
            "could not resume within {w:g} s: cable unplugged; still trying to reach hub {addr}",
            w=self.resume_window, addr=self.address,
        )

    @_machine.output()
    def _settle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.state)

    def _dial(self) -> None:
        from sevpn.cardlink import CardLinkFactory

        self.attempts += 1
        attempt = self._attempt = object()
        d = self._dialing = self._endpoints[self._node % len(self._endpoints)].connect(CardLinkFactory(self, attempt))

        def failed(failure):
            if not failure.check(CancelledError):
                self.attempt_ended(attempt, describe_failure(failure))

        d.addErrback(failed)

    disconnected.upon(_connect, enter=connecting, outputs=[_start])
    disconnected.upon(_disconnect, enter=disconnected, outputs=[])

    connecting.upon(_connect, enter=connecting, outputs=[_stop_dialing, _start])
    connecting.upon(_disconnect, enter=disconnected, outputs=[_stop_dialing, _log_unplugged, _settle])
    connecting.upon(_welcomed, enter=connected, outputs=[_new_session, _settle])
    connecting.upon(_refused, enter=refused, outputs=[_stop_dialing, _log_refused, _settle])
    connecting.upon(_attempt_failed, enter=connecting, outputs=[_note_failure, _retry_later])
    connecting.upon(_give_up, enter=disconnected, outputs=[_stop_dialing, _log_gave_up, _settle])

    connected.upon(_connect, enter=connecting, outputs=[_goodbye_to_switch, _end_session, _start])
    connected.upon(_disconnect, enter=disconnected, outputs=[_goodbye_to_leave, _end_session, _log_unplugged, _settle])
    connected.upon(_link_broke, enter=resuming, outputs=[_log_broke, _open_window, _redial])
    connected.upon(_session_closed, enter=connecting, outputs=[_log_closed, _end_session, _redial])
    connected.upon(_give_up, enter=disconnected, outputs=[_end_session, _log_gave_up, _settle])
    connected.upon(_attempt_failed, enter=connected, outputs=[])  # a late word of the attempt that connected

    resuming.upon(_connect, enter=connecting, outputs=[_stop_dialing, _end_session, _start])
    resuming.upon(_disconnect, enter=disconnected, outputs=[_stop_dialing, _end_session, _log_unplugged, _settle])
    resuming.upon(_resumed, enter=connected, outputs=[_take_back, _settle])
    resuming.upon(_welcomed, enter=connected, outputs=[_log_lost_session, _end_old_session, _new_session, _settle])
    resuming.upon(_refused, enter=refused, outputs=[_stop_dialing, _end_session, _log_refused, _settle])
    resuming.upon(_attempt_failed, enter=resuming, outputs=[_note_failure, _retry_later])
    resuming.upon(_give_up, enter=disconnected, outputs=[_stop_dialing, _end_session, _log_gave_up, _settle])
    resuming.upon(_window_passed, enter=connecting, outputs=[_log_window_passed, _end_session])

    refused.upon(_connect, enter=connecting, outputs=[_start])
    refused.upon(_disconnect, enter=disconnected, outputs=[])

    # status ----------------------------------------------------------------

    def status(self) -> dict:
        """The card's state, account, session and counters (C{sevpn nic status})."""
        now = self.clock.seconds()
        account = self.account
        session = self.session
        info = {
            "state": self.state,
            "account": account.name if account else None,
            "hub": self.address if account else None,
            "hub_name": account.hub_name if account else None,
            "user": account.user if account else None,
            "mac": format_mac(self.mac),
            "tap": self.lan.name,
            "carrier": bool(self.lan.carrier),
            "session": session.id if session else None,
            "uptime": round(now - self.connected_since, 1) if self.connected_since is not None else None,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "resume_window": self.resume_window,
            "offload": self.offload,
        }
        info.update(self.lan.counters())
        if session is not None:
            for key, value in session.port.counters().items():
                info[key] = info.get(key, 0) + value if key in ("bad_frames", "congestion_drops") else value
        return info
