"""
The virtual HUB's policy: who may join which virtual hub, the sessions and
their resume window, and switching frames between them.

No sockets here: links (L{sevpn.hublink.HubLink}) call L{Hub.authenticate}
and then L{Hub.join} when a card says hello, and a session's frames go
through its virtual hub's switch (L{sevpn.switch.VirtualHub}).  Time comes
from the injected clock.
"""

from __future__ import annotations

import base64
import hmac
import os
from typing import Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sevpn import offload as vnet
from sevpn import wire
from sevpn.link import Link, Session
from sevpn.mac import format_mac, parse_mac
from sevpn.sequencing import DEFAULT_LIMIT
from sevpn.switch import DEFAULT_MAX_AGE, VirtualHub
from sevpn.timing import LoginThrottle
from sevpn.users import HubState

#: How long a session whose link broke without a goodbye is kept (seed 6).
DEFAULT_RESUME_WINDOW = 60.0
#: At most this many sessions per hub process.
DEFAULT_MAX_SESSIONS = 4096


class Refused(Exception):
    """A card may not join; C{code} for programs, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


REFUSALS = {
    "auth-failed": "the user name or password is wrong",
    "unknown-hub": "there is no virtual hub of that name on this server",
    "user-disabled": "this user is disabled on the virtual hub",
    "hub-full": "the hub has reached its session limit",
    "bad-hello": "the hello message is incomplete",
    "throttled": "too many failed logins from this address; try again later",
}


class HubSession(Session):
    """A card's session on one virtual hub: a port of its switch."""

    def __init__(
        self, hub: "Hub", vhub: VirtualHub, user: str, session_id: str, token: bytes, card_mac: Optional[bytes],
        offload: bool = False,
    ) -> None:
        super().__init__(hub.buffer_limit)
        #: Frames to and from this card carry a virtio_net_hdr (kernel offload).
        self.offload = offload
        self.mac_offset = vnet.HEADER_SIZE if offload else 0
        self.bad_frames = 0
        self.hub = hub
        self.vhub = vhub
        self.user = user
        self.id = session_id
        self.token = token
        self.card_mac = card_mac
        self.started = hub.clock.seconds()
        self.peer = ""
        self.pending: List = []
        self.expiry = None
        self.ended = False

    def __repr__(self) -> str:
        return f"<HubSession {self.id} {self.user}@{self.vhub.name}>"

    # as a port of the switch -----------------------------------------------

    def enqueue(self, frame, offset: int) -> None:
        if not self.pending:
            self.hub.dirty.append(self)
        if offset == self.mac_offset:
            self.pending.append(frame)
        elif self.offload:
            self.pending.append(vnet.from_plain(frame))
        else:
            # A super-frame for a card without offload: segment it here.
            try:
                self.pending.extend(vnet.to_plain(frame))
            except vnet.BadFrame:
                self.bad_frames += 1

    def flush(self, source: Optional[Link] = None) -> None:
        """
        Send what was switched to this card.  If its link is paused, the
        link that brought the frames stops being read until it resumes
        (TCP flow control carries that back to the sending card, which drops
        at its edge if the pause lasts); a queue that still overflows (floods
        from many cards) or a card that stalled has its frames dropped, as a
        congested switch port does.
        """
        frames, self.pending = self.pending, []
        link = self.link
        if link is not None and link.full:
            self.congestion_drops += len(frames)
            return
        self.send_frames(frames)
        if link is not None and link.paused and source is not None:
            link.hold_back(source)

    # as a session ----------------------------------------------------------

    def deliver(self, frames) -> None:
        self.vhub.forward(self, frames, self.hub.clock.seconds())

    def link_lost(self, link: Link, clean: bool, reason: str) -> None:
        self.hub.link_lost(self, clean, reason)

    def describe(self, now: float) -> dict:
        info = {
            "id": self.id,
            "hub": self.vhub.name,
            "user": self.user,
            "card_mac": format_mac(self.card_mac) if self.card_mac else None,
            "peer": self.peer,
            "state": "connected" if self.link is not None else "held",
            "offload": self.offload,
            "bad_frames": self.bad_frames,
            "uptime": round(now - self.started, 1),
        }
        info.update(self.counters())
        return info


class Hub:
    """All virtual hubs of one server and their sessions."""

    log = Logger()

    def __init__(
        self,
        state: HubState,
        clock: IReactorTime,
        resume_window: float = DEFAULT_RESUME_WINDOW,
        buffer_limit: int = DEFAULT_LIMIT,
        max_age: float = DEFAULT_MAX_AGE,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        verify=maybeDeferred,
        throttle: Optional[LoginThrottle] = None,
    ) -> None:
        self.verify = verify
        self.throttle = throttle or LoginThrottle()
        self.state = state
        self.clock = clock
        self.resume_window = resume_window
        self.buffer_limit = buffer_limit
        self.max_age = max_age
        self.max_sessions = max_sessions
        self.vhubs: Dict[str, VirtualHub] = {}
        self.sessions: Dict[str, HubSession] = {}
        self.dirty: List[HubSession] = []
        self.refusals = 0

    def vhub(self, name: str) -> VirtualHub:
        vhub = self.vhubs.get(name)
        if vhub is None:
            vhub = self.vhubs[name] = VirtualHub(name, max_age=self.max_age, on_duplicate=self._duplicate)
        return vhub

    # joining ---------------------------------------------------------------

    def authenticate(self, link: Link, hello: dict) -> Deferred:
        """
        Check a hello's credentials: a Deferred that fails with L{Refused}.
        The slow hash runs where C{self.verify} puts it (a thread, in the
        hub service), so logins never stall the frames of other sessions.
        """
        hub_name, user, password = hello.get("hub"), hello.get("user"), hello.get("password")
        if not all(isinstance(x, str) for x in (hub_name, user, password)):
            return fail(Refused("bad-hello", REFUSALS["bad-hello"]))
        peer = link.peer_name()
        address = peer.rsplit(":", 1)[0]
        now = self.clock.seconds()
        wait = self.throttle.blocked_for(address, now)
        if wait:
            self.refusals += 1
            self.log.warn(
                "refused {user} from {peer}: too many failed logins from this address ({wait:.0f} s to go)",
                user=user, peer=peer, wait=wait,
            )
            return fail(Refused("throttled", REFUSALS["throttled"]))

        def checked(code):
            if code is None:
                self.throttle.succeeded(address)
            else:
                self.throttle.failed(address, self.clock.seconds())
                self.refusals += 1
                self.log.warn(
                    "refused {user} from {peer} on virtual hub {hub}: {why}",
                    user=user, peer=peer, hub=hub_name, why=REFUSALS[code],
                )
                raise Refused(code, REFUSALS[code])

        return self.verify(self.state.authenticate, hub_name, user, password.encode("utf-8")).addCallback(checked)

    def join(self, link: Link, hello: dict) -> Tuple[HubSession, bool, int]:
        """
        After L{authenticate}: the session (resumed or fresh), whether it
        was resumed, and the last frame the card says it received.
        """
        hub_name, user = hello["hub"], hello["user"]
        peer = link.peer_name()
        resume = hello.get("resume")
        if isinstance(resume, dict):
            session = self._resumable(resume, user, hub_name)
            if session is not None:
                received = resume.get("received")
                if not isinstance(received, int) or received < 0:
                    raise Refused("bad-hello", REFUSALS["bad-hello"])
                self._take_over(session, link)
                session.resumes += 1
                self.log.info(
                    "session {id} of {user} on {hub} resumed from {peer} (resume #{n})",
                    id=session.id, user=user, hub=hub_name, peer=peer, n=session.resumes,
                )
                return session, True, received
            self.log.info(
                "{user} from {peer} asked to resume a session this hub does not hold; starting a fresh one",
                user=user, peer=peer,
            )
        if len(self.sessions) >= self.max_sessions:
            raise Refused("hub-full", REFUSALS["hub-full"])
        card_mac = None
        if isinstance(hello.get("mac"), str):
            try:
                card_mac = parse_mac(hello["mac"])
            except ValueError:
                card_mac = None
        offload = wire.offers(hello, wire.FEATURE_OFFLOAD)
        session = HubSession(
            self, self.vhub(hub_name), user, os.urandom(8).hex(), os.urandom(32), card_mac, offload
        )
        session.peer = peer
        self.sessions[session.id] = session
        session.link = link
        session.vhub.add_port(session)
        self.log.info(
            "{user} joined virtual hub {hub} from {peer}: session {id}",
            user=user, hub=hub_name, peer=peer, id=session.id,
        )
        return session, False, 0

    def _resumable(self, resume: dict, user: str, hub_name: str) -> Optional[HubSession]:
        session = self.sessions.get(resume.get("session")) if isinstance(resume.get("session"), str) else None
        try:
            token = base64.b64decode(resume.get("token", ""), validate=True)
        except (ValueError, TypeError):
            token = b""
        if session is None or session.ended:
            return None
        # The token is compared first and in constant time, whoever asks.
        if not hmac.compare_digest(session.token, token):
            return None
        if session.user != user or session.vhub.name != hub_name:
            return None
        return session

    def _take_over(self, session: HubSession, link: Link) -> None:
        if session.expiry is not None and session.expiry.active():
            session.expiry.cancel()
        session.expiry = None
        old = session.link
        if old is not None:
            # The card is back before the hub noticed the old link die.
            old.session = None
            old.fail("the card resumed its session on a new connection")
        session.link = link
        session.peer = link.peer_name()

    # leaving ---------------------------------------------------------------

    def link_lost(self, session: HubSession, clean: bool, reason: str) -> None:
        if session.ended:
            return
        if clean or self.resume_window <= 0:
            self.end_session(session, "said goodbye" if clean else reason)
            return
        self.log.info(
            "session {id} of {user} on {hub} lost its link ({reason}); holding it for {w:g} s",
            id=session.id, user=session.user, hub=session.vhub.name, reason=reason, w=self.resume_window,
        )
        session.expiry = self.clock.callLater(self.resume_window, self._expire, session)

    def _expire(self, session: HubSession) -> None:
        session.expiry = None
        self.end_session(session, f"not resumed within {self.resume_window:g} s")

    def end_session(self, session: HubSession, why: str) -> None:
        if session.ended:
            return
        session.ended = True
        if session.expiry is not None and session.expiry.active():
            session.expiry.cancel()
        session.expiry = None
        self.sessions.pop(session.id, None)
        session.vhub.remove_port(session)
        session.pending = []
        self.log.info(
            "session {id} of {user} on {hub} ended: {why}",
            id=session.id, user=session.user, hub=session.vhub.name, why=why,
        )

    def shutdown(self) -> List[Link]:
        """Say goodbye on every link (the cards will not wait to resume)."""
        links = []
        for session in list(self.sessions.values()):
            if session.link is not None:
                links.append(session.link)
                session.link.say_goodbye("the hub is shutting down")
            self.end_session(session, "the hub is shutting down")
        return links

    # switching -------------------------------------------------------------

    def flush(self, source: Optional[Link] = None) -> None:
        """Send what the last read from C{source} switched: one write per destination."""
        dirty, self.dirty = self.dirty, []
        for session in dirty:
            if session.pending:
                session.flush(source)

    def _duplicate(self, vhub: VirtualHub, dup) -> None:
        self.log.warn(
            "MAC {mac} is used by more than one card on virtual hub {hub} (sessions {ids}); "
            "frames to it go to whichever sent last",
            mac=format_mac(dup.mac), hub=vhub.name, ids=", ".join(sorted(p.id for p in dup.ports)),
        )

    # status ----------------------------------------------------------------

    def describe_sessions(self) -> List[dict]:
        now = self.clock.seconds()
        return [s.describe(now) for s in sorted(self.sessions.values(), key=lambda s: (s.vhub.name, s.started))]

    def describe_macs(self) -> Dict[str, dict]:
        now = self.clock.seconds()
        name_of = lambda port: port.id  # noqa: E731
        out = {}
        for name in sorted(set(self.state.hubs()) | set(self.vhubs)):
            vhub = self.vhubs.get(name)
            if vhub is None:
                vhub = VirtualHub(name)  # not used yet: empty, all counters 0
            vhub.expire(now)
            out[name] = {
                "macs": vhub.describe_table(now, name_of),
                "duplicates": vhub.describe_duplicates(name_of),
                "counters": vhub.counters(),
            }
        return out

    def token_text(self, session: HubSession) -> str:
        return base64.b64encode(session.token).decode("ascii")


