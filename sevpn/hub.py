"""
The virtual HUB's policy: who may join which virtual hub, the sessions and
their resume window, and the switches they are ports of.

No sockets and no protocols here: a hub link (L{sevpn.hublink.HubLink})
asks L{Hub.authenticate} and L{Hub.join} when a card says hello, and tells
L{Hub.link_lost} when a session's link goes.  Each session is a port
(L{sevpn.port.SessionPort}) of its virtual hub's switch
(L{sevpn.switch.VirtualHub}).  Time comes from the injected clock.
"""

from __future__ import annotations

import base64
import hmac
import os
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sevpn import defaults, wire
from sevpn.guard import LoginGuard, SourceSummary
from sevpn.loops import LoopGuard
from sevpn.mac import InvalidMAC, format_mac, parse_mac
from sevpn.port import SessionPort
from sevpn.sequencing import DEFAULT_LIMIT, Budget
from sevpn.session import ILink, Session
from sevpn.switch import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_MACS, Conflict, VirtualHub
from sevpn.users import IUserStore, StateError
from sevpn.wire import Refusal

#: How often the MAC tables are swept for aged entries.
SWEEP_INTERVAL = 30.0


class Refused(Exception):
    """A card may not join: the L{wire.Refused} message to answer with."""

    def __init__(self, code: str) -> None:
        super().__init__(Refusal.MESSAGES[code])
        self.message = wire.Refused.of(code)


class HubSession(Session):
    """A card's session on one virtual hub, and the switch port it is."""

    def __init__(
        self, hub: "Hub", vhub: VirtualHub, user: str, session_id: str, token: bytes,
        card_mac: Optional[bytes], offload: bool = False, max_macs: int = 0,
    ) -> None:
        super().__init__(hub.buffer_limit, hub.budget)
        self.hub = hub
        self.vhub = vhub
        self.user = user
        self.id = session_id
        self.token = token
        self.card_mac = card_mac
        #: Frames to and from this card carry a virtio_net_hdr (kernel offload).
        self.offload = offload
        self.port = SessionPort(session_id, self, hub.clock, mac_offset=10 if offload else 0, max_macs=max_macs)
        self.started = hub.clock.seconds()
        self.peer = ""
        self.expiry = None
        self.ended = False
        #: Another hub's cascade (a whole LAN behind this session), not a card.
        self.cascade = False
        #: The SHA-256 fingerprint of the client certificate the card logged
        #: in with (its last login, when resumed), or None for a password.
        self.certificate: Optional[str] = None

    def __repr__(self) -> str:
        return f"<HubSession {self.id} {self.user}@{self.vhub.name}>"

    @property
    def held(self) -> bool:
        """No link carries the session: it waits for its card to resume."""
        return self.link is None

    def describe(self, now: float) -> dict:
        """
        The session as a row of C{sevpn hub sessions}: who, where, its state
        (connected or held), how it logged in, and its port's counters (and the
        loop guard's state, for a cascade).
        """
        info = {
            "id": self.id,
            "hub": self.vhub.name,
            "user": self.user,
            "card_mac": format_mac(self.card_mac) if self.card_mac else None,
            "peer": self.peer,
            "state": "held" if self.held else "connected",
            "offload": self.offload,
            "uptime": round(now - self.started, 1),
            "macs": len(self.port.macs),
            "kind": "cascade" if self.cascade else "card",
            "auth": "certificate" if self.certificate else "password",
            "certificate": self.certificate,
        }
        info.update(self.port.counters())
        if self.cascade:
            info.update(self.hub.loops.describe(self.vhub, self.port))
        return info


class Hub:
    """All virtual hubs of one server and their sessions."""

    log = Logger()

    def __init__(
        self,
        state: IUserStore,
        clock: IReactorTime,
        resume_window: float = defaults.RESUME_WINDOW,
        buffer_limit: int = DEFAULT_LIMIT,
        max_age: float = DEFAULT_MAX_AGE,
        max_sessions: int = defaults.MAX_SESSIONS,
        verify=maybeDeferred,
        guard: Optional[LoginGuard] = None,
        max_sessions_per_user: int = defaults.MAX_SESSIONS_PER_USER,
        max_macs_per_session: int = DEFAULT_MAX_MACS,
        resume_memory: int = defaults.RESUME_MEMORY,
        allow_mac_moves: bool = False,
    ) -> None:
        self.allow_mac_moves = allow_mac_moves
        self.verify = verify
        self.guard = guard or LoginGuard()
        self.summary = SourceSummary()
        self.max_sessions_per_user = max_sessions_per_user
        self.max_macs_per_session = max_macs_per_session
        #: What all sessions' send logs may hold together (held ones first to go).
        self.budget = Budget(resume_memory)
        self.state = state
        self.clock = clock
        self.resume_window = resume_window
        self.buffer_limit = buffer_limit
        self.max_age = max_age
        self.max_sessions = max_sessions
        self.vhubs: Dict[str, VirtualHub] = {}
        self.sessions: Dict[str, HubSession] = {}
        self.refusals = 0
        #: Refused logins by refusal code.
        self.refusals_by_code: Dict[str, int] = {}
        self._sweep_call = None
        #: Finds and breaks loops of cascades (see L{sevpn.loops}).
        self.loops = LoopGuard(clock)
        #: Called with each virtual hub's switch when it is made (C{--workers}: its backplane port).
        self.vhub_added: List[Callable[[VirtualHub], None]] = []
        #: Called with each fresh (not resumed) session once it joined (C{--workers}: the other workers hear of it).
        self.joined: List[Callable[[HubSession], None]] = []

    def vhub(self, name: str) -> VirtualHub:
        vhub = self.vhubs.get(name)
        if vhub is None:
            vhub = self.vhubs[name] = VirtualHub(
                name, self.clock.seconds, max_age=self.max_age, max_macs_per_port=self.max_macs_per_session,
                allow_moves=self.allow_mac_moves, on_conflict=self._conflict,
                # room for every session's own MAC and as many again (VMs behind cards, bridged LANs)
                max_entries=max(DEFAULT_MAX_ENTRIES, 2 * self.max_sessions),
            )
            for added in self.vhub_added:
                added(vhub)
        return vhub

    def start(self) -> None:
        """Start the periodic sweep of aged MAC entries."""
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        self._sweep_call = self.clock.callLater(SWEEP_INTERVAL, self._sweep)
        for vhub in self.vhubs.values():
            vhub.expire()
        for address, count in self.summary.due(self.clock.seconds()):
            self.log.warn(
                "refused {count} more logins from {address} in the last {interval:g} s",
                count=count, address=address, interval=self.summary.interval,
            )

    # joining ---------------------------------------------------------------

    def authenticate(self, peer: str, address: str, hello: wire.Hello, certificate: Optional[str] = None) -> Deferred:
        """
        Check a hello's credentials: its password, or when it has none, the
        client certificate its TLS connection carried (verified against
        the hub's CA by TLS), which must be registered to the hello's user
        (L{IUserStore.certificate_login}).  A Deferred that fires with the
        certificate's fingerprint if the card logged in with it (None for
        a password), or fails with L{Refused}.  The check runs where
        C{self.verify} puts it (a thread, in the hub service), so slow
        hashes never stall the frames of other sessions; L{LoginGuard}
        decides first whether it runs at all, for both kinds alike.

        @param certificate: the SHA-256 fingerprint of the certificate the
            card presented, if it did.
        """
        if hello.password is None and certificate is None:
            return fail(self._refuse(peer, address, hello, Refusal.BAD_HELLO))
        wait = self.guard.begin(address, hello.user, self.clock.seconds())
        if wait is not None:
            return fail(self._refuse(peer, address, hello, Refusal.THROTTLED))
        login = None if hello.password is not None else certificate

        def checked(code):
            self.guard.end(address, hello.user, code is None, self.clock.seconds())
            if code is not None:
                raise self._refuse(peer, address, hello, code)
            return login

        def broke(failure):
            self.guard.end(address, hello.user, False, self.clock.seconds())
            return failure

        if login is None:
            d = self.verify(self.state.authenticate, hello.hub, hello.user, hello.password.encode("utf-8"))
        else:
            d = self.verify(self.state.certificate_login, hello.hub, hello.user, login)
        return d.addCallbacks(checked, broke)

    def _refuse(self, peer: str, address: str, hello: Optional[wire.Hello], code: str) -> Refused:
        """Count and log (once per address per interval) a refusal; the exception to raise."""
        self.refusals += 1
        self.refusals_by_code[code] = self.refusals_by_code.get(code, 0) + 1
        if self.summary.note(address, self.clock.seconds()):
            self.log.warn(
                "refused {user} from {peer} on virtual hub {hub}: {why}",
                user=wire.quote(hello.user) if hello else "?", peer=peer,
                hub=wire.quote(hello.hub) if hello else "?", why=Refusal.MESSAGES[code],
            )
        return Refused(code)

    def join(self, peer: str, hello: wire.Hello, certificate: Optional[str] = None) -> Tuple[HubSession, bool, int]:
        """
        After L{authenticate}: the session (resumed or fresh), whether it
        was resumed, and the last frame the card says it received.  Raises
        L{Refused}.

        @param certificate: what L{authenticate} fired with: the
            fingerprint of the certificate the card logged in with, if it
            did (its session ends when that certificate is revoked).
        """
        if hello.resume is not None:
            session = self._resumable(hello.resume, hello.user, hello.hub)
            if session is not None:
                if not session.can_resume_from(hello.resume.received):
                    raise Refused(Refusal.BAD_HELLO)
                self._take_over(session, peer)
                session.certificate = certificate
                session.resumes += 1
                self.log.info(
                    "session {id} of {user} on {hub} resumed from {peer} (resume #{n})",
                    id=session.id, user=hello.user, hub=hello.hub, peer=peer, n=session.resumes,
                )
                return session, True, hello.resume.received
            self.log.info(
                "{user} from {peer} asked to resume a session this hub does not hold; starting a fresh one",
                user=hello.user, peer=peer,
            )
        try:
            card_mac = parse_mac(hello.mac) if hello.mac else None
        except InvalidMAC:
            card_mac = None
        if card_mac is not None:
            self._end_replaced(hello.user, hello.hub, card_mac)
        address = peer.rsplit(":", 1)[0].strip("[]")
        if len(self.sessions) >= self.max_sessions:
            raise self._refuse(peer, address, hello, Refusal.HUB_FULL)
        policy = self.state.policy(hello.hub, hello.user)
        cascade = wire.FEATURE_CASCADE in hello.features
        if cascade and not self.state.cascade_user(hello.hub, hello.user):
            raise self._refuse(peer, address, hello, Refusal.CASCADE_NOT_ALLOWED)
        limit = policy.get("max_sessions") or self.max_sessions_per_user
        if limit and sum(1 for s in self.sessions.values() if s.user == hello.user and s.vhub.name == hello.hub) >= limit:
            raise self._refuse(peer, address, hello, Refusal.TOO_MANY_SESSIONS)
        vhub = self.vhub(hello.hub)
        session = HubSession(
            self, vhub, hello.user, os.urandom(8).hex(), os.urandom(32), card_mac,
            wire.FEATURE_OFFLOAD in hello.features,
            # a cascade has a whole LAN behind it: room for as many MACs as the table holds
            max_macs=policy.get("max_macs") or (vhub.max_entries if cascade else 0),
        )
        session.peer = peer
        session.cascade = cascade
        session.certificate = certificate
        self.sessions[session.id] = session
        self._apply_policy(session, policy)
        vhub.add_port(session.port)
        if cascade:
            self.loops.add_remote_end(vhub, session.port)
        elif card_mac is not None:
            vhub.claim(card_mac, session.port)  # a cascade's hello MAC names no station
        self.log.info(
            "{user} joined virtual hub {hub} from {peer}{how}: session {id}",
            user=hello.user, hub=hello.hub, peer=peer, id=session.id,
            how=f" with certificate {certificate}" if certificate else "",
        )
        for joined in self.joined:
            joined(session)
        return session, False, 0

    def welcome(self, session: HubSession, resumed: bool, channel=None) -> wire.Welcome:
        """The WELCOME for C{session}; with the UDP C{channel} opened beside its link, if any."""
        features = {wire.FEATURE_OFFLOAD} if session.offload else set()
        if session.cascade:
            features.add(wire.FEATURE_CASCADE)
        if channel is not None:
            features.add(wire.FEATURE_UDP)
        return wire.Welcome(
            session=session.id,
            token=base64.b64encode(session.token).decode("ascii"),
            resumed=resumed,
            received=session.delivered,
            hub=session.vhub.name,
            resume_window=self.resume_window,
            features=frozenset(features),
            udp_port=channel.port if channel is not None else None,
            udp_channel=channel.id if channel is not None else None,
        )

    def _apply_policy(self, session: HubSession, policy: dict) -> None:
        """A user's rates on their session's port (missing: unlimited)."""
        session.port.set_limits(
            out_bits=policy.get("rate_out", 0), flood_frames=policy.get("broadcast_pps", 0),
            in_bits=policy.get("rate_in", 0),
        )

    def policies_changed(self) -> None:
        """The users file changed: apply every user's policy to their live sessions."""
        for session in self.sessions.values():
            policy = self.state.policy(session.vhub.name, session.user)
            self._apply_policy(session, policy)
            session.port.max_macs = policy.get("max_macs") or (session.vhub.max_entries if session.cascade else 0)

    def _resumable(self, resume: wire.Resume, user: str, hub_name: str) -> Optional[HubSession]:
        session = self.sessions.get(resume.session)
        try:
            token = base64.b64decode(resume.token, validate=True)
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

    def _take_over(self, session: HubSession, peer: str) -> None:
        old = session.link
        if old is not None:
            # The card is back before the hub noticed the old link die.
            old.fail("the card resumed its session on a new connection")
        self._cancel_expiry(session)
        session.peer = peer

    def _end_replaced(self, user: str, hub: str, card_mac: bytes) -> None:
        """
        A fresh login from a card ends that card's held sessions: its holder
        is gone (a restarted card cannot resume), and its MACs would block
        the new session's until the window passed.
        """
        for old in list(self.sessions.values()):
            if old.held and old.user == user and old.vhub.name == hub and old.card_mac == card_mac:
                self.end_session(old, "replaced by a new login of the same card")

    def end_card(self, user: str, hub: str, card_mac: bytes, why: str) -> List[HubSession]:
        """
        The card (C{user} with C{card_mac}) logged in afresh elsewhere (on
        another worker of this node, C{--workers}): end its sessions here,
        held or not (a connection of its that still looks alive is a dead
        one not noticed yet), with a goodbye saying C{why}.
        """
        ended = [s for s in self.sessions.values()
                 if s.user == user and s.vhub.name == hub and s.card_mac == card_mac and not s.cascade]
        for session in ended:
            self.end_with_goodbye(session, why)
        return ended

    def _replaced(self, session: HubSession) -> bool:
        """Whether the same card (user and MAC) joined in a newer session."""
        return session.card_mac is not None and any(
            other is not session and other.user == session.user and other.vhub is session.vhub
            and other.card_mac == session.card_mac and other.started >= session.started
            for other in self.sessions.values()
        )

    # leaving ---------------------------------------------------------------

    def link_lost(self, session: HubSession, clean: bool, reason: str) -> None:
        """C{session}'s link is gone; C{clean} if a goodbye was said."""
        if session.ended or not session.held:
            return
        if clean or self.resume_window <= 0:
            self.end_session(session, f"the card said goodbye ({reason})" if clean else reason)
            return
        if self._replaced(session):
            self.end_session(session, f"{reason}; its card has logged in again since")
            return
        self.log.info(
            "session {id} of {user} on {hub} lost its link ({reason}); holding it for {w:g} s",
            id=session.id, user=session.user, hub=session.vhub.name, reason=reason, w=self.resume_window,
        )
        session.expiry = self.clock.callLater(self.resume_window, self._expire, session)

    def _expire(self, session: HubSession) -> None:
        session.expiry = None
        self.end_session(session, f"not resumed within {self.resume_window:g} s")

    def _cancel_expiry(self, session: HubSession) -> None:
        if session.expiry is not None and session.expiry.active():
            session.expiry.cancel()
        session.expiry = None

    def end_session(self, session: HubSession, why: str) -> None:
        """
        End C{session} for good (once): its port leaves the virtual hub and the
        loop guard, what it held is let go, and the log says C{why}.  Its link,
        if any, is left to the caller (L{end_with_goodbye} tells the card).
        """
        if session.ended:
            return
        session.ended = True
        self._cancel_expiry(session)
        self.sessions.pop(session.id, None)
        self.loops.remove(session.vhub, session.port)
        session.vhub.remove_port(session.port)
        session.port.close()
        session.close()
        self.log.info(
            "session {id} of {user} on {hub} ended: {why}",
            id=session.id, user=session.user, hub=session.vhub.name, why=why,
        )

    def shutdown(self) -> List[ILink]:
        """Say goodbye on every link (the cards will not wait to resume)."""
        links = []
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        for session in list(self.sessions.values()):
            link = session.link
            if link is not None:
                links.append(link)
                link.say_goodbye("the hub is shutting down")
            self.end_session(session, "the hub is shutting down")
        return links

    # the operator ------------------------------------------------------------

    def kick(self, session_id: str, reason: str) -> HubSession:
        """
        End session C{session_id} now, saying goodbye with C{reason} (the
        card logs it and starts a fresh session).  Raises C{KeyError}.
        """
        session = self.sessions[session_id]
        self.end_with_goodbye(session, reason)
        return session

    def end_with_goodbye(self, session: HubSession, reason: str) -> None:
        """End C{session} (logged with C{reason}) and tell its card why on its link, if it has one."""
        link = session.link
        self.end_session(session, reason)
        if link is not None:
            link.say_goodbye(reason)

    def users_changed(self) -> Tuple[List[Tuple[HubSession, str]], List[str]]:
        """
        The operator changed the users files: end the sessions of users who
        were deleted or disabled, of deleted virtual hubs, and those that
        logged in with a certificate that was revoked since (each with a
        goodbye saying why), then apply the others' current policy
        (L{policies_changed}).

        @return: the ended sessions with the reason, and the errors: a
            damaged users file leaves its virtual hub's sessions as they
            are, and the policies as they were until it is fixed.
        """
        ended: List[Tuple[HubSession, str]] = []
        errors: Dict[str, str] = {}
        for session in list(self.sessions.values()):
            hub = session.vhub.name
            if hub in errors or session.ended:
                continue
            try:
                why = self.state.revoked(hub, session.user, session.certificate)
            except StateError as e:
                errors[hub] = str(e)
                self.log.error("cannot apply the users of virtual hub {hub}: {why}", hub=hub, why=str(e))
                continue
            if why:
                self.end_with_goodbye(session, why)
                ended.append((session, why))
        if not errors:
            self.policies_changed()
        return ended, list(errors.values())

    def _conflict(self, vhub: VirtualHub, conflict: Conflict) -> None:
        self.log.warn(
            "MAC {mac} is used by more than one port of virtual hub {hub} ({ports}); "
            "{what}",
            mac=format_mac(conflict.mac), hub=vhub.name, ports=", ".join(sorted(p.name for p in conflict.ports)),
            what="frames to it go to whichever sent last" if vhub.allow_moves
            else "the first keeps it; frames from the others are dropped",
        )

    # status ----------------------------------------------------------------

    def describe_sessions(self) -> List[dict]:
        now = self.clock.seconds()
        return [s.describe(now) for s in sorted(self.sessions.values(), key=lambda s: (s.vhub.name, s.started))]

    def describe_macs(self) -> Dict[str, dict]:
        out = {}
        for name in sorted(set(self.state.hubs()) | set(self.vhubs)):
            vhub = self.vhubs.get(name) or VirtualHub(name, self.clock.seconds)  # not used yet: empty
            out[name] = {
                "macs": vhub.describe_table(),
                "conflicts": vhub.describe_conflicts(),
                "counters": vhub.counters(),
            }
        return out
