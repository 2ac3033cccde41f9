"""
The virtual LAN card's policy: its life on a real line.

Seed facts 4-6 as states: the cable is unplugged (no carrier) until a hub
welcomes the card; a lost link is retried forever (L{ClientService} with
L{sevpn.timing.Backoff}); within the resume window the carrier stays up,
frames from the TAP are held, and the session resumes without loss; a
refusal by the hub stops the retrying and says why.

I/O is injected: the TAP (anything with C{write_frames}, C{set_carrier},
C{start_reading}) and C{endpoint_for(account)}.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from sevpn import offload as vnet
from sevpn import wire
from sevpn.accounts import Account
from sevpn.link import Link, Session, describe_failure
from sevpn.mac import format_mac
from sevpn.sequencing import DEFAULT_LIMIT
from sevpn.timing import Backoff, Keepalive

DEFAULT_RESUME_WINDOW = 60.0

IDLE = "disconnected"
CONNECTING = "connecting"
CONNECTED = "connected"
RESUMING = "resuming"
REFUSED = "refused"


class _ReconnectingService(ClientService):
    """
    Twisted's reconnecting service, without its log line for every retry
    (forever, every few seconds during an outage): the card logs what
    matters once (lost, cannot connect and why, connected, resumed).
    """

    _log = Logger(observer=lambda event: None)


class CardSession(Session):
    """The card's side of a session with the hub."""

    def __init__(self, card: "Card", session_id: str, token: str, wire_offload: bool) -> None:
        super().__init__(card.buffer_limit)
        self.card = card
        self.id = session_id
        self.token = token
        self.started = card.clock.seconds()
        #: The TAP speaks offload frames but the hub did not agree to carry
        #: them: the card converts both ways itself.
        self.convert = card.offload and not wire_offload
        self.bad_frames = 0

    def send_frames(self, frames) -> None:
        link = self.link
        if link is not None and link.full:
            # The link to the hub is a switch port like any other: once its
            # queue is full, drop at the edge, so the applications' TCP backs
            # off instead of queueing deeper (latency under load).
            self.congestion_drops += len(frames)
            return
        if self.convert:
            plain = []
            for frame in frames:
                try:
                    plain.extend(vnet.to_plain(frame))
                except vnet.BadFrame:
                    self.bad_frames += 1
            frames = plain
        super().send_frames(frames)

    def deliver(self, frames) -> None:
        if self.convert:
            frames = [vnet.from_plain(f) for f in frames]
        self.card.tap.write_frames(frames)

    def link_lost(self, link: Link, clean: bool, reason: str) -> None:
        self.card.link_lost(link, clean, reason)


class Card:
    log = Logger()

    def __init__(
        self,
        reactor,
        tap,
        mac: bytes,
        endpoint_for: Callable[[Account], object],
        keepalive: Optional[Keepalive] = None,
        resume_window: float = DEFAULT_RESUME_WINDOW,
        buffer_limit: int = DEFAULT_LIMIT,
        backoff: Optional[Callable[[int], float]] = None,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.tap = tap
        self.mac = mac
        self.endpoint_for = endpoint_for
        self.keepalive = keepalive or Keepalive()
        self.resume_window = resume_window
        self.buffer_limit = buffer_limit
        self.backoff = backoff or Backoff()
        self.state = IDLE
        self.account: Optional[Account] = None
        self.session: Optional[CardSession] = None
        self.service: Optional[ClientService] = None
        self.last_error: Optional[str] = None
        self.connected_since: Optional[float] = None
        self.reconnects = 0
        self.attempts = 0
        self.failures = 0
        self.unplugged_drops = 0
        self._window = None

    @property
    def offload(self) -> bool:
        """Whether the TAP hands over offload super-frames."""
        return bool(getattr(self.tap, "offload", False))

    # the TAP side ----------------------------------------------------------

    def tap_frames(self, frames) -> None:
        session = self.session
        if session is None:
            self.unplugged_drops += len(frames)
            return
        session.send_frames(frames)

    # the user's side -------------------------------------------------------

    def connect(self, account: Account) -> None:
        """Dial C{account} and keep it connected (seed facts 4, 5)."""
        endpoint = self.endpoint_for(account)  # raises with a sentence if unusable
        self._stop_service()
        self._end_session(None)
        self.account = account
        self.state = CONNECTING
        self.last_error = None
        self.attempts = 0
        self.failures = 0
        self.log.info(
            "connecting to hub {hub} at {addr} as user {user}",
            hub=account.hub_name, addr=account.hub, user=account.user,
        )
        from sevpn.cardlink import CardLinkFactory

        self.service = _ReconnectingService(
            _ReportFailures(endpoint, self),
            CardLinkFactory(self),
            retryPolicy=self._retry_delay,
            clock=self.clock,
        )
        self.service.startService()
        self.tap.start_reading()

    def disconnect(self, reason: str = "disconnected by the user") -> Deferred:
        """Unplug the cable: goodbye to the hub, no retrying, no resume."""
        was = self.state
        self.state = IDLE
        if self.session is not None and self.session.link is not None:
            self.session.link.say_goodbye(reason)
        self._end_session(None)
        done = self._stop_service()
        if was != IDLE:
            self.log.info("{reason}: cable unplugged", reason=reason)
        return done

    def _stop_service(self) -> Deferred:
        service, self.service = self.service, None
        if service is None:
            return succeed(None)
        return service.stopService()

    def _retry_delay(self, attempt: int) -> float:
        """
        The retry policy.  A TCP connection that dies before the hub's
        welcome counts as a failure too, so the card counts failures
        itself rather than trusting ClientService's attempt number.
        """
        self.attempts += 1
        if self.account is not None and not self.account.auto_reconnect:
            self.clock.callLater(0, self._give_up)
        return self.backoff(self.failures + 1)

    def _give_up(self) -> None:
        if self.state in (CONNECTING, RESUMING):
            self.disconnect("automatic reconnection is off for this account; gave up")

    # the link's side -------------------------------------------------------

    def hello(self) -> dict:
        account = self.account
        hello = {
            "hub": account.hub_name,
            "user": account.user,
            "password": account.password,
            "mac": format_mac(self.mac),
            "features": [wire.FEATURE_OFFLOAD] if self.offload else [],
        }
        if self.session is not None:
            hello["resume"] = {
                "session": self.session.id,
                "token": self.session.token,
                "received": self.session.received.received,
            }
        return hello

    def welcomed(self, link: Link, welcome: dict) -> None:
        session = self.session
        if welcome.get("resumed") is True and session is not None and welcome.get("session") == session.id:
            self._cancel_window()
            received = welcome.get("received")
            if not isinstance(received, int) or received < 0:
                link.fail("the hub's welcome has no valid 'received' count")
                return
            session.link = link
            link.session = session
            link.ready = True
            session.resumes += 1
            session.resend(received)
            self.log.info(
                "resumed session with hub {hub} at {addr}: {n} frames resent, nothing lost",
                hub=self.account.hub_name, addr=self.account.hub, n=session.sent.retransmitted,
            )
        else:
            session_id, token = welcome.get("session"), welcome.get("token")
            if not isinstance(session_id, str) or not isinstance(token, str):
                link.fail("the hub's welcome has no session id or token")
                return
            if session is not None:
                self.log.info(
                    "the hub no longer had our session (it restarted or the window passed); starting a fresh one"
                )
                self._end_session(None)
            self._cancel_window()
            wire_offload = wire.offers(welcome, wire.FEATURE_OFFLOAD)
            session = self.session = CardSession(self, session_id, token, wire_offload)
            session.link = link
            link.session = session
            link.ready = True
            self.tap.set_carrier(True)
            self.connected_since = self.clock.seconds()
            self.log.info(
                "connected to hub {hub} at {addr} as {user}: cable plugged in",
                hub=self.account.hub_name, addr=self.account.hub, user=self.account.user,
            )
        self.state = CONNECTED
        self.last_error = None
        self.failures = 0

    def refused(self, code: str, message: str) -> None:
        if code == "throttled":
            # Not a verdict on this account (the address may be shared):
            # the link's end counts as a failed attempt, retried as usual.
            return
        self.state = REFUSED
        self.last_error = f"the hub refused the connection: {message}"
        self._end_session(None)
        self.log.error(
            "hub {hub} at {addr} refused user {user}: {message}; not retrying until you connect again",
            hub=self.account.hub_name, addr=self.account.hub, user=self.account.user, message=message,
        )
        self.clock.callLater(0, self._stop_service)

    def attempt_failed(self, reason: str) -> None:
        """A connection attempt ended before a welcome."""
        self.failures += 1
        if self.state == REFUSED or reason == self.last_error:
            return
        self.last_error = reason
        if self.account is not None:
            self.log.warn(
                "cannot connect to hub {addr}: {reason}; retrying", addr=self.account.hub, reason=reason
            )

    def link_lost(self, link: Link, clean: bool, reason: str) -> None:
        if self.state in (IDLE, REFUSED):
            return
        self.reconnects += 1
        if clean or self.resume_window <= 0:
            self.log.info("hub {addr} closed the session ({reason}); reconnecting", addr=self.account.hub, reason=reason)
            self._end_session(None)
            self.state = CONNECTING
            return
        self.state = RESUMING
        self.last_error = reason
        self.log.warn(
            "lost the link to hub {addr} ({reason}); holding frames and resuming within {w:g} s",
            addr=self.account.hub, reason=reason, w=self.resume_window,
        )
        self._cancel_window()
        self._window = self.clock.callLater(self.resume_window, self._window_passed)

    def _window_passed(self) -> None:
        self._window = None
        if self.state != RESUMING:
            return
        self.log.warn(
            "could not resume within {w:g} s: cable unplugged; still trying to reach hub {addr}",
            w=self.resume_window, addr=self.account.hub,
        )
        self._end_session(None)
        self.state = CONNECTING

    def _cancel_window(self) -> None:
        if self._window is not None and self._window.active():
            self._window.cancel()
        self._window = None

    def _end_session(self, _why) -> None:
        self._cancel_window()
        session, self.session = self.session, None
        if session is not None and session.link is not None:
            session.link.session = None
            session.link.ready = False
            session.link = None
        self.connected_since = None
        if self.tap.carrier:
            self.tap.set_carrier(False)

    # status ----------------------------------------------------------------

    def status(self) -> dict:
        now = self.clock.seconds()
        account = self.account
        session = self.session
        info = {
            "state": self.state,
            "account": account.name if account else None,
            "hub": account.hub if account else None,
            "hub_name": account.hub_name if account else None,
            "user": account.user if account else None,
            "mac": format_mac(self.mac),
            "tap": getattr(self.tap, "name", None),
            "carrier": bool(self.tap.carrier),
            "session": session.id if session else None,
            "uptime": round(now - self.connected_since, 1) if self.connected_since is not None else None,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "resume_window": self.resume_window,
            "unplugged_drops": self.unplugged_drops,
            "tap_write_drops": getattr(self.tap, "write_drops", 0),
            "offload": self.offload,
            "bad_frames": getattr(self.tap, "bad_frames", 0) + (session.bad_frames if session else 0),
        }
        if session is not None:
            info.update(session.counters())
        return info



@implementer(IStreamClientEndpoint)
class _ReportFailures:
    """An endpoint that tells the card why a connection attempt failed."""

    def __init__(self, endpoint, card: Card) -> None:
        self.endpoint = endpoint
        self.card = card

    def __repr__(self) -> str:
        return f"hub {self.card.account.hub}" if self.card.account else "hub"

    def connect(self, factory):
        def failed(failure):
            if not failure.check(CancelledError):
                self.card.attempt_failed(describe_failure(failure))
            return failure

        return self.endpoint.connect(factory).addErrback(failed)
