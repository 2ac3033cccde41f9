"""
The hub as a Twisted service: where the hub's policy (L{sevpn.hub.Hub})
meets the real world: its state dir, its certificates, the TLS listening
ports and the control socket.  The reactor is a parameter; the global one
is only looked up when none is given.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import Iterable, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from sevpn import __version__, busypoll, control, defaults, web, wire
from sevpn.cardservice import tls_endpoint_for
from sevpn.cascade import CascadeManager
from sevpn.bridge import BridgeError, attach_bridges, describe_bridges, detach_bridges
from sevpn.fabric import FabricError
from sevpn.fabricport import attach_fabric, describe_fabric, detach_fabric
from sevpn.files import StateDir, os_error
from sevpn.hub import Hub
from sevpn.hublink import HubLinkFactory
from sevpn.metrics import read_hub
from sevpn.pki import ensure_pki, server_tls_options
from sevpn.runtime import fatal, reactor_or_global
from sevpn.sdnotify import notify
from sevpn.sequencing import DEFAULT_LIMIT
from sevpn.switch import DEFAULT_MAX_AGE
from sevpn.timing import Keepalive
from sevpn.tls import TLSFactory
from sevpn.users import IUserStore, StateError, open_user_store
from sevpn.workers import WorkersError


def listen_descriptions(listen: Sequence[str]) -> List[str]:
    """
    What to listen on.  The default (L{defaults.LISTEN}) is one IPv6 socket
    that takes IPv4 too; where the host has no IPv6 that becomes IPv4
    alone, and where IPv6 sockets are IPv6-only (C{bindv6only}) IPv4 is
    added beside it.  Explicit endpoints are taken as they are.
    """
    listen = list(listen)
    if listen and listen != list(defaults.LISTEN):
        return listen
    port = defaults.PORT
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.close()
    except OSError:
        return [f"tcp:{port}"]
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as f:
            v6only = f.read().strip() == "1"
    except OSError:
        v6only = False
    return [f"tcp6:{port}", f"tcp:{port}"] if v6only else [f"tcp6:{port}"]


def release_large_blocks() -> None:
    """
    Make glibc return large freed blocks to the OS.  Each password check
    (scrypt) takes 16 MiB in a pool thread; with glibc's adaptive mmap
    threshold those blocks would stay resident in every thread's arena
    (~170 MiB after a login storm instead of ~10).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


class HubService(Service):
    """
    The hub process (C{twistd sevpn-hub}), or one worker of it: the user
    store, the CA and server certificate, the TLS and UDP ports, local
    bridges, fabric ports, cascades, the control socket and the metrics page
    around one L{Hub}.
    """

    log = Logger()

    def __init__(
        self,
        state_dir: str = defaults.HUB_STATE_DIR,
        listen: Sequence[str] = defaults.LISTEN,
        hostnames: Iterable[str] = (),
        resume_window: float = defaults.RESUME_WINDOW,
        keepalive: Optional[Keepalive] = None,
        buffer_limit: int = DEFAULT_LIMIT,
        max_age: float = DEFAULT_MAX_AGE,
        limits: Optional[dict] = None,
        busy_poll: float = busypoll.WINDOW,
        metrics: Optional[str] = None,
        metrics_public: bool = False,
        reactor=None,
        bridges: Sequence[Tuple[str, str]] = (),
        bridge_taps: Sequence[Tuple[str, str]] = (),
        bridge_force: bool = False,
        fabric: Sequence[Tuple[str, int]] = (),
        worker: int = 0,
        role=None,
        udp: bool = True,
        udp_listen: Optional[str] = None,
        udp_mode: str = "auto",
        users: Optional[str] = None,
        users_settings: Optional[dict] = None,
    ) -> None:
        """
        @param limits: the hub's bounds per actor, passed to L{Hub}
            (C{max_sessions_per_user}, C{max_macs_per_session},
            C{resume_memory}, C{allow_mac_moves}).
        @param udp: offer cards a UDP channel (L{sevpn.channel}).
        @param udp_listen: its address, C{udp:PORT[:interface=ADDRESS]};
            None: beside the first C{listen} endpoint.
        @param users: where the users live: None for the state dir's
            files, or the C{postgresql://} URL of the database the nodes
            of a fabric share (L{sevpn.users.open_user_store}).
        @param users_settings: for that database: C{grace}, C{poll},
            C{timeout}, C{retry} (L{sevpn.pgusers.PostgresUserStore}).
        """
        self.busy_poll = busy_poll
        self.udp = udp
        self.udp_mode = udp_mode
        self.udp_listen = udp_listen
        self.udp_channels = None
        self.udp_socket = None
        #: The UDP address bound, as C{udp:PORT[:interface=...]}.
        self.udp_spec: Optional[str] = None
        self.limits = dict(limits or {})
        self.state_dir = state_dir
        self.listen = listen_descriptions(listen)
        self.hostnames = list(hostnames)
        self.resume_window = resume_window
        self.keepalive = keepalive or Keepalive()
        self.buffer_limit = buffer_limit
        self.max_age = max_age
        self.reactor = reactor
        #: The endpoint of the metrics and status page listener (L{sevpn.web}), if any.
        self.metrics = metrics
        self.metrics_public = metrics_public
        self.metrics_port = None
        self.hub: Optional[Hub] = None
        self.cascades: Optional[CascadeManager] = None
        self.ports = []
        self.control_port = None
        #: Local bridges: (virtual hub, interface) and (virtual hub, TAP name).
        self.bridges = list(bridges)
        self.bridge_taps = list(bridge_taps)
        self.bridge_force = bridge_force
        self.bridge_ports = []
        #: Virtual hubs in the node's fabric: (virtual hub, VNI); this process's worker number.
        self.fabric = list(fabric)
        self.worker = worker
        self.fabric_members = []
        #: With --workers N > 1: this process's part of the node's hub
        #: (L{sevpn.workers.MainRole} or C{WorkerRole}); None: the one process.
        self.role = role
        self.users = users
        self.users_settings = dict(users_settings or {})
        self.user_store: Optional[IUserStore] = None
        self.user_watch = None

    def startService(self) -> None:
        """
        Open everything the hub needs, in order, or stop the process with one
        sentence (L{fatal}) after closing what was opened: a damaged users file,
        a port in use or a missing virtual hub is said at start, not at the
        first login.
        """
        reactor = reactor_or_global(self.reactor)
        release_large_blocks()
        busypoll.install(reactor, self.busy_poll)
        try:
            StateDir(self.state_dir).create().check(os.geteuid())
            state = self.user_store = open_user_store(self.state_dir, self.users, **self.users_settings)
            state.ensure_default()
            for name in state.hubs():
                state.users(name)  # a damaged users file is said now, not at the first login
            cert, key = ensure_pki(self.state_dir, self.hostnames)
            self.in_thread = partial(deferToThreadPool, reactor, reactor.getThreadPool())
            self.hub = Hub(
                state, reactor, resume_window=self.resume_window, buffer_limit=self.buffer_limit,
                max_age=self.max_age, verify=self.in_thread, **self.limits,
            )
            self.hub.start()
            self.udp_channels = self._listen_udp(reactor)
            self.user_watch = state.watch(reactor, self._users_changed_elsewhere)
            self.user_watch.startService()
            self.links = HubLinkFactory(self.hub, reactor, self.keepalive, udp=self.udp_channels)
            self.cascades = CascadeManager(self.hub, self.state_dir, tls_endpoint_for(reactor), self.keepalive)
            factory = TLSFactory(server_tls_options(cert, key), False, self.links)
            if self.role is not None:
                self.ports = self.role.listen(reactor, self.listen, factory)
            else:
                for description in self.listen:
                    result = []
                    serverFromString(reactor, description).listen(factory).addBoth(result.append)
                    if not result or not hasattr(result[0], "stopListening"):
                        why = result[0].getErrorMessage() if result else "no answer"
                        raise StateError(f"cannot listen on {description}: {why}")
                    self.ports.append(result[0])
            if self.role is None or self.role.main:
                self._attach_bridges(state, reactor)
            self._attach_fabric(state, reactor)  # every worker: its TAP is its fabric port
            self.control_port = (control.listen if self.role is None else self.role.control)(
                reactor,
                self.state_dir,
                {
                    "sessions": self.sessions,
                    "macs": self.hub.describe_macs,
                    "status": self.status,
                    "cascades": self.cascades.describe,
                    "cascade-reload": self.cascades.reload,
                    "users-changed": self.users_changed,
                    "kick": self.kick,
                    "fabric": self.fabric_status,
                    "reading": partial(read_hub, self.hub, self.links),
                },
            )
            if self.metrics and (self.role is None or self.role.main):
                read = partial(read_hub, self.hub, self.links)
                if self.role is not None:
                    read = self.role.reading(read)
                self.metrics_port = web.listen(reactor, self.metrics, read, public=self.metrics_public)
            if self.role is None or self.role.main:
                self.cascades.reload()
            if self.role is not None:
                self.role.start(self.hub, reactor, state)
        except (StateError, BridgeError, FabricError, WorkersError, control.ControlError, OSError, ValueError) as e:
            self._close()
            if self.hub is not None:
                self.hub.shutdown()  # its sweep timer must not outlive a failed start
            if self.user_store is not None:
                self.user_store.close()
            raise fatal("sevpn-hub", str(os_error(e, "use") if isinstance(e, OSError) else e))
        Service.startService(self)
        listening = self.listen + ([self.udp_spec] if self.udp_channels is not None else [])
        notify("READY=1", f"STATUS=listening on {', '.join(listening)}")
        self.log.info(
            "hub running: listening on {listen}, virtual hubs {hubs}, users in {users}, CA certificate {ca}",
            listen=", ".join(listening), hubs=", ".join(state.hubs()), ca=os.path.join(self.state_dir, "ca.pem"),
            users=state.describe()["where"],
        )

    def sessions(self) -> list:
        """The cards' and other hubs' cascades' sessions, then this hub's own cascades."""
        return self.hub.describe_sessions() + self.cascades.describe()
    def users_changed(self):
        """
        The C{users-changed} control command: read the users again (in a
        thread: the store may be a database), then L{Hub.users_changed}.
        """

        def apply(_):
            ended, errors = self.hub.users_changed()
            return {
                "ended": [{"id": s.id, "hub": s.vhub.name, "user": s.user, "reason": why} for s, why in ended],
                "errors": errors,
            }

        def unreadable(failure):
            failure.trap(StateError)
            raise control.ControlError(failure.getErrorMessage())

        return self.in_thread(self.user_store.refresh).addCallbacks(apply, unreadable)

    def _users_changed_elsewhere(self) -> None:
        """Another node changed the shared users: apply them here too (the hub logs each session it ends)."""
        self.hub.users_changed()

    def kick(self, session: str, reason: str = "") -> dict:
        """The C{kick} control command: end a session with a goodbye saying why."""
        reason = (str(reason or "") or "ended by the operator")[: wire.MAX_REASON]
        try:
            ended = self.hub.kick(str(session), reason)
        except KeyError:
            raise control.ControlError(f"there is no session {session} on this hub (see 'sevpn hub sessions')")
        return {"id": ended.id, "hub": ended.vhub.name, "user": ended.user, "reason": reason}

    def _attach_bridges(self, state: IUserStore, reactor) -> None:
        for option, pairs in (("--bridge", self.bridges), ("--bridge-tap", self.bridge_taps)):
            for hub_name, name in pairs:
                if not state.exists(hub_name):
                    raise BridgeError(f"{option} {hub_name}={name}: there is no virtual hub named {hub_name} "
                                      f"(create it with 'sevpn hub create {hub_name}')")
        listening = [getattr(port.getHost(), "host", None) for port in self.ports]
        self.bridge_ports = attach_bridges(
            self.hub.vhub, reactor, self.bridges, self.bridge_taps, [h for h in listening if h], self.bridge_force,
        )

    def _attach_fabric(self, state: IUserStore, reactor) -> None:
        for hub_name, vni in self.fabric:
            if not state.exists(hub_name):
                raise FabricError(f"--fabric {hub_name}={vni}: there is no virtual hub named {hub_name} "
                                  f"(create it with 'sevpn hub create {hub_name}')")
        self.fabric_members = attach_fabric(self.hub.vhub, reactor, self.fabric, self.worker)

    def fabric_status(self) -> dict:
        """C{sevpn hub fabric}: this worker's part of the node's fabric."""
        return {"worker": self.worker, "segments": describe_fabric(self.fabric_members)}

    def _listen_udp(self, reactor):
        """The UDP port for the cards' channels, or None (logged) when there is none."""
        from sevpn import tls, udp
        from sevpn.channel import HubChannels

        if not self.udp:
            return None
        spec = self.udp_listen or udp.default_spec(self.listen[0])
        if spec is None:
            self.log.warn("UDP channel off: its port cannot be told from --listen {listen}; give --udp-listen",
                          listen=self.listen[0])
            return None
        if tls.EXPORTER_MISSING is not None:
            self.log.warn("UDP channel off: {why}", why=tls.EXPORTER_MISSING)
            return None
        # Hub workers share their ports as a group (sevpn.reuseport); a
        # role that can hand this worker its UDP socket of such a group
        # offers listen_udp(spec) -> a bound socket.  Until then, workers
        # offer no UDP: each would bind the same port alone.
        listen_udp = getattr(self.role, "listen_udp", None) if self.role is not None else None
        if self.role is not None and listen_udp is None:
            self.log.warn("UDP channel off: hub workers share no UDP port yet")
            return None
        channels = HubChannels(reactor, 0, mode=self.udp_mode)
        try:
            if listen_udp is not None:
                self.udp_socket = udp.adopt(reactor, listen_udp(spec), channels)
            else:
                self.udp_socket = udp.listen(reactor, spec, channels)
        except udp.SpecError as e:
            raise StateError(f"--udp-listen: {e}")
        except OSError as e:
            raise StateError(f"cannot listen on {spec} (--udp-listen): {e.strerror or e}")
        channels.port = self.udp_socket.port
        channels.transport = self.udp_socket
        host = self.udp_socket.socket.getsockname()[0]
        self.udp_spec = f"udp:{channels.port}" + ("" if host in ("0.0.0.0", "::") else f":interface={host}")
        return channels

    def status(self) -> dict:
        """
        The C{status} control command: what the hub listens on, its virtual
        hubs, sessions, refusals and bounds' counters.
        """
        hub = self.hub
        udp = {"udp": self.udp_spec if self.udp_channels is not None else None}
        if self.udp_channels is not None:
            udp.update(self.udp_channels.counters())
        return {
            "version": __version__,
            "state_dir": os.path.abspath(self.state_dir),
            "listen": self.listen,
            "virtual_hubs": hub.state.hubs(),
            "users": hub.state.describe(),
            "sessions": len(hub.sessions),
            "refusals": hub.refusals,
            "handshaking": self.links.handshaking,
            "turned_away": self.links.turned_away,
            "certificates_refused": self.links.certificates_refused,
            "resume_window": hub.resume_window,
            "cascades": len(self.cascades.cascades),
            "loops": hub.loops.counters(),
            "bridges": describe_bridges(self.bridge_ports),
            **(self.role.status() if self.role is not None else {}),
            **udp,
        }

    def _close(self) -> list:
        """Stop listening; return Deferreds that fire when the ports are closed."""
        if self.user_watch is not None:
            self.user_watch.stopService()
            self.user_watch = None
        detach_bridges(self.bridge_ports)
        self.bridge_ports = []
        detach_fabric(self.fabric_members)
        self.fabric_members = []
        ports = self.ports + [p for p in (self.control_port, self.metrics_port) if p is not None]
        self.ports, self.control_port, self.metrics_port = [], None, None
        if self.udp_socket is not None:
            self.udp_socket.close()
            self.udp_socket = None
        return [maybeDeferred(port.stopListening) for port in ports]

    def _stopped(self, _) -> None:
        if self.user_store is not None:
            self.user_store.close()
        self.log.info("hub stopped")

    def stopService(self):
        """Say goodbye to every card, waiting at most two seconds for it."""
        busypoll.uninstall()
        notify("STOPPING=1", "STATUS=saying goodbye to the cards")
        Service.stopService(self)
        cascades = self.cascades.stop() if self.cascades is not None else []
        links = self.hub.shutdown() if self.hub is not None else []
        closing = self._close()
        goodbyes = gatherResults([link.when_closed() for link in links] + cascades)
        goodbyes.addTimeout(2, reactor_or_global(self.reactor))
        workers = [self.role.stop()] if self.role is not None else []
        done = gatherResults([goodbyes.addErrback(lambda _: None)] + closing + workers)
        done.addBoth(self._stopped)
        return done
