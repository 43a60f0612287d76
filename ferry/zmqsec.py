"""ZeroMQ CURVE plumbing shared by the outer API and the inner consumer endpoint.

Configuration follows what was measured on pyzmq 27 / libzmq 4.3.5 (see
docs/API.md): a ZAP authenticator started before the socket binds, a
non-empty ``zap_domain`` with ``ZAP_ENFORCE_DOMAIN`` so a missing
authenticator fails closed, the allow-list consulted on every handshake and
the ``User-Id`` of every message checked again against the live allow-list
(removing a key does not disconnect a client already connected).

Keys are ferry ``x25519`` keys (``ferry keygen --role api-client``); CURVE
wants them Z85-encoded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import monitor, z85

from ferry import log
from ferry.audit.record import format_ts
from ferry.config_types import ApiClient
from ferry.crypto.keys import PublicKey, SecretKey
from ferry.errors import ConfigError, FerryError, SelfTestError

MAX_CLIENT_FILES = 10_000
FD_RESERVE = 256  # descriptors kept for the agent's own files, whatever the connections
FD_WANTED = 65536  # the soft descriptor limit an agent raises itself to (up to the hard one)
GUARD_SWEEP = 5.0  # seconds between checks that each connection counted is still open
MAX_PREVIOUS_KEYS = 3  # as the config schemas allow
RELOAD_INTERVAL = 1.0

_log = log.get("zmqsec")


def z85_public(key: PublicKey) -> bytes:
    if key.alg != "x25519":
        raise FerryError(f"CURVE needs an x25519 key, not {key.alg}")
    return bytes(z85.encode(key.raw))


def z85_secret(key: SecretKey) -> bytes:
    if key.alg != "x25519":
        raise FerryError(f"CURVE needs an x25519 key, not {key.alg}")
    return bytes(z85.encode(key.raw))


@dataclass(frozen=True)
class Allowed:
    client: ApiClient
    z85: str


class Allowlist:
    """A folder of ``<name>.yaml`` entries, re-read when anything in it changes.

    Thread-safe: the ZAP thread asks :meth:`allows` on each handshake, the
    server thread asks :meth:`lookup` on each message. A bad file is logged
    and left out (fail closed for that client); the others stay valid.
    """

    def __init__(self, folder: Path, *, clock: Any = time.time) -> None:
        self.folder = folder
        self._clock = clock
        self._lock = threading.Lock()
        self._by_key: dict[str, Allowed] = {}
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._next_check = 0.0
        self.errors: dict[str, str] = {}
        #: Called (on the authenticator thread) with the z85 key of a refused handshake.
        self.on_refused: Callable[[str], None] | None = None
        #: Called (on the authenticator thread) with the ZAP domain and the client of an
        #: allowed handshake.
        self.on_allowed: Callable[[str, ApiClient], None] | None = None
        self.reload()

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = sorted(os.scandir(self.folder), key=lambda e: e.name)
        except OSError:
            return ()
        out = []
        for e in entries[:MAX_CLIENT_FILES]:
            if e.name.endswith((".yaml", ".yml")) and not e.name.startswith("."):
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                out.append((e.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def reload(self, force: bool = False) -> bool:
        """Re-read the folder if it changed; return True if it was re-read."""
        from ferry.config import load_allowlist_entry  # noqa: PLC0415  # (import cycle)

        stamp = self._scan()
        if not force and stamp == self._stamp:
            return False
        by_key: dict[str, Allowed] = {}
        errors: dict[str, str] = {}
        shared: dict[str, str] = {}  # keys in more than one file: refused in every one
        files: dict[str, str] = {}  # the file of each key taken
        for name, _, _ in stamp:
            try:
                entry = load_allowlist_entry(self.folder / name)
                key = PublicKey.from_string(entry.public_key)
                zkey = z85_public(key).decode("ascii")
            except (ConfigError, FerryError) as exc:
                errors[name] = str(exc)
                continue
            if zkey in shared:
                errors[name] = f"same key as {shared[zkey]}; all of them refused"
                continue
            if zkey in by_key:
                first = by_key.pop(zkey).client.name
                shared[zkey] = first
                errors[name] = f"same key as {first}; all of them refused"
                errors[files[zkey]] = f"same key as {entry.name}; all of them refused"
                continue
            by_key[zkey] = Allowed(entry, zkey)
            files[zkey] = name
        with self._lock:
            self._by_key = by_key
            self._stamp = stamp
            self.errors = errors
        for name, err in errors.items():
            _log.error("allowlist_entry_refused", folder=str(self.folder), file=name, error=err)
        _log.info("allowlist_loaded", folder=str(self.folder), clients=len(by_key))
        return True

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + RELOAD_INTERVAL
            self.reload()

    def lookup(self, z85_key: str) -> ApiClient | None:
        """The client with this key if it is allowed right now (present, not expired)."""
        with self._lock:
            found = self._by_key.get(z85_key)
        if found is None:
            return None
        exp = found.client.expires_us
        if exp is not None and self._clock() * 1e6 >= exp:
            return None
        return found.client

    # ZAP credentials-provider protocol (pyzmq): called on the authenticator thread.
    def callback(self, domain: str, key: bytes) -> bool:
        client = self.lookup(key.decode("ascii", "replace"))
        if client is None:
            z85 = key.decode("ascii", "replace")
            with _SELF_TEST_LOCK:
                self_test = z85 in _SELF_TEST_KEYS
            if self_test:  # (this agent's own start-up check: not a stranger knocking)
                _log.info("self_test_refused", domain=domain)
                return False
            _log.warning("handshake_refused", domain=domain, key=z85, public_key=_named(key))
            if self.on_refused is not None:
                self.on_refused(z85)
        elif self.on_allowed is not None:
            self.on_allowed(domain, client)
        return client is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)


def start_authenticator(
    ctx: zmq.Context[Any], domains: Sequence[str], allow: Allowlist
) -> ThreadAuthenticator:
    """Start the ZAP handler for ``domains`` on ``ctx`` (before any socket binds); a
    handshake in any other domain is refused."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    for domain in domains:
        auth.configure_curve_callback(domain, credentials_provider=allow)
    return auth


@dataclass
class ServedKey:
    """A CURVE server key, the ZAP domain of its endpoints and who came in with it."""

    key: SecretKey
    domain: str
    current: bool
    endpoints: dict[str, str] = field(default_factory=dict)
    """Socket kind (``api``, ``consumers``, ``publish``) -> the endpoint bound."""
    clients: dict[str, float] = field(default_factory=dict)
    """Client name -> time of its last handshake (Unix seconds)."""


class ServerKeys:
    """The current CURVE server key and, during a rotation, earlier ones (at most
    MAX_PREVIOUS_KEYS), each served on endpoints of its own.

    libzmq copies a socket's options into each listener when it binds, so one socket bound
    once per key answers each endpoint with that endpoint's key. Each key gets its own ZAP
    domain (``<domain>`` for the current one, ``<domain>/previous-N`` for earlier ones): the
    authenticator sees which key a client came in with, and operators can tell when no
    client uses an earlier key any more (docs/OPERATIONS.md).
    """

    def __init__(self, domain: str, current: SecretKey, previous: Sequence[SecretKey]) -> None:
        if len(previous) > MAX_PREVIOUS_KEYS:
            raise ConfigError(f"at most {MAX_PREVIOUS_KEYS} previous server keys")
        self.served = [ServedKey(current, domain, True)] + [
            ServedKey(key, f"{domain}/previous-{i}", False) for i, key in enumerate(previous, 1)
        ]
        ids = {s.key.public.key_id for s in self.served}
        if len(ids) != len(self.served):
            raise ConfigError("a previous server key is the current key, or is given twice")
        self._by_domain = {s.domain: s for s in self.served}
        self._lock = threading.Lock()
        #: Called on the authenticator thread for each allowed handshake: (key, client, first
        #: time this run).
        self.on_handshake: Callable[[ServedKey, ApiClient, bool], None] | None = None

    @property
    def domains(self) -> list[str]:
        return [s.domain for s in self.served]

    @property
    def current(self) -> ServedKey:
        return self.served[0]

    def in_use(self, role: str) -> list[tuple[str, PublicKey, bool]]:
        """(role, public key, current) of each key, for the audit's key.activated/retired."""
        return [(role, s.key.public, s.current) for s in self.served]

    def bind(self, sock: zmq.Socket[Any], kind: str, endpoints: Sequence[str | None]) -> None:
        """Bind ``sock`` at ``endpoints[i]`` with key ``i`` (None: key ``i`` is not served on
        this socket). The socket's options are left at the current key."""
        for served, endpoint in reversed(list(zip(self.served, endpoints, strict=True))):
            if endpoint is not None:
                _set_key(sock, served.key, served.domain)
                sock.bind(endpoint)
                served.endpoints[kind] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        _set_key(sock, self.current.key, self.current.domain)

    def handshake(self, domain: str, client: ApiClient) -> None:
        """Note an allowed handshake (the Allowlist's ``on_allowed``)."""
        served = self._by_domain.get(domain)
        if served is None:
            return
        with self._lock:
            first = client.name not in served.clients
            if first and len(served.clients) >= MAX_CLIENT_FILES:
                served.clients.pop(next(iter(served.clients)))
            served.clients[client.name] = time.time()
        if self.on_handshake is not None:
            self.on_handshake(served, client, first)

    def check_rejects_strangers(self) -> None:
        """The start-up self-test (:func:`check_rejects_strangers`) on every endpoint."""
        for served in self.served:
            for kind, endpoint in served.endpoints.items():
                if kind != "publish":  # (a PUB socket says nothing back to test with)
                    check_rejects_strangers(endpoint, served.key.public)

    def status(self) -> list[dict[str, object]]:
        """The earlier keys still served, their endpoints, and who used each since start."""
        with self._lock:
            return [
                {
                    "key_id": s.key.public.key_id.hex(),
                    "public_key": s.key.public.to_string(),
                    "endpoints": dict(s.endpoints),
                    "clients": {
                        name: format_ts(int(t * 1e6)) for name, t in sorted(s.clients.items())
                    },
                }
                for s in self.served
                if not s.current
            ]


def _set_key(sock: zmq.Socket[Any], secret: SecretKey, domain: str) -> None:
    sock.curve_secretkey = z85_secret(secret)
    sock.curve_publickey = z85_public(secret.public)
    sock.zap_domain = domain.encode()


def curve_server(
    ctx: zmq.Context[Any],
    kind: int,
    secret: SecretKey,
    domain: str,
    *,
    max_message: int,
    hwm: int = 10_000,
    rcvhwm: int | None = None,
) -> zmq.Socket[Any]:
    """A socket that only accepts CURVE clients the ``domain`` ZAP handler allows.
    ``rcvhwm``: messages queued per connection on the way in, when not ``hwm``."""
    sock: zmq.Socket[Any] = ctx.socket(kind)
    _set_key(sock, secret, domain)
    sock.curve_server = True
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.rcvhwm = hwm if rcvhwm is None else rcvhwm
    sock.sndhwm = hwm
    sock.sndtimeo = 100
    sock.linger = 1000
    sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 15000)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 10000)
    return sock


def curve_client(
    ctx: zmq.Context[Any],
    kind: int,
    secret: SecretKey,
    server: PublicKey,
    *,
    hwm: int = 10_000,
) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.curve_secretkey = z85_secret(secret)
    sock.curve_publickey = z85_public(secret.public)
    sock.curve_serverkey = z85_public(server)
    sock.rcvhwm = hwm
    sock.sndhwm = hwm
    sock.linger = 0
    sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
    return sock


def raise_fd_limit(wanted: int = FD_WANTED) -> int:
    """Raise this process's soft limit on open descriptors towards ``wanted`` (never past
    the hard limit; a shell's default soft limit is often 1024); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            _log.warning("fd_limit_not_raised", soft=soft, hard=hard, error=str(exc))
    return int(soft) if soft != resource.RLIM_INFINITY else wanted


def connection_budget(wanted: int, sockets: int = 1) -> int:
    """How many connections each of ``sockets`` guarded sockets may hold: ``wanted``, or
    fewer if the descriptor limit is low. FD_RESERVE descriptors are kept for the agent's own
    files, and half of the rest for the connections a flood gets accepted before the guard
    shuts them (libzmq accepts faster than the guard can answer)."""
    soft = raise_fd_limit()
    room = max(16, (soft - FD_RESERVE) // 2 // max(1, sockets))
    if wanted > room:
        _log.warning("connections_limited_by_fd_limit", wanted=wanted, allowed=room, fd_limit=soft)
        return room
    return wanted


Ends = tuple[object, object]  # a connection's (local, peer) addresses, as the socket gives them


def _peer(fd: int) -> tuple[socket.socket | None, Ends]:
    """A duplicate of descriptor ``fd`` if it is a connected socket, and its (local, peer)
    addresses; ``(None, ((), ()))`` if it is gone or something else now."""
    try:
        copy = os.dup(fd)
    except OSError:
        return None, ((), ())
    try:
        dup = socket.socket(fileno=copy)
    except OSError:  # (not a socket now)
        os.close(copy)
        return None, ((), ())
    try:
        return dup, (dup.getsockname(), dup.getpeername())
    except OSError:
        dup.close()
        return None, ((), ())


def _ours(endpoint: str, local: object) -> bool:
    """Whether a connection whose local address is ``local`` was accepted at ``endpoint``
    (the listener a monitor event names): its port (and address, unless the listener's is a
    wildcard or a name), or its ipc path."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if isinstance(local, bytes):  # (an abstract socket's name: bytes, from a NUL)
            local = os.fsdecode(local)
        return local == ("\0" + path[1:] if path.startswith("@") else path)
    if not endpoint.startswith("tcp://") or not isinstance(local, tuple) or len(local) < 2:
        return False
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if str(local[1]) != port:
        return False
    host = host.strip("[]")
    try:
        listener = ipaddress.ip_address(host)
    except ValueError:
        return True  # (a name: the port decides)
    if listener.is_unspecified:
        return True
    try:
        here = ipaddress.ip_address(str(local[0]).split("%")[0])
    except ValueError:
        return False
    mapped = getattr(here, "ipv4_mapped", None)
    return listener in (here, mapped)


class ConnectionGuard:
    """Bounds the TCP connections a server socket holds: at most ``total``, and at most
    ``per_address`` from one peer address (ipc connections: the total only).

    libzmq accepts every connection itself and has no call to drop one (its maintainers'
    answer is a firewall), so one client, or anyone who can reach the port, could open
    connections until the agent runs out of descriptors; then libzmq spins, the API stops
    answering and the agent cannot open its own files. The guard watches the socket's
    monitor (ACCEPTED and DISCONNECTED, with the connection's descriptor) on a thread of its
    own and shuts down a connection past a limit: ``shutdown(2)`` on a duplicate of the
    descriptor, which libzmq sees as the peer gone, and closes. That happens milliseconds
    after the accept, so under a flood a few connections past a limit finish their
    handshake, and may be answered, before they are shut. An event is handled after the
    fact: by then its descriptor may be closed and its number taken by another socket of the
    agent, so the guard acts only on a socket whose local address is the listener's (the
    event names it). ``on_refused(address, why, count)`` is called for each refusal (on the
    guard's thread). A monitor event lost is made good by a sweep every GUARD_SWEEP seconds:
    an entry whose descriptor is no longer the same connection is dropped.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        name: str,
        *,
        total: int,
        per_address: int,
        on_refused: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.name = name
        self.total = total
        self.per_address = per_address
        self.on_refused = on_refused
        self.refused = 0
        self._open: dict[int, tuple[str, Ends]] = {}  # descriptor -> (peer address, ends)
        self._by_address: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        endpoint = f"inproc://ferry-guard-{name}-{id(self):x}"
        sock.monitor(endpoint, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._mon: zmq.Socket[Any] = sock.context.socket(zmq.PAIR)
        self._mon.rcvhwm = 0  # (no event dropped however far behind the thread is)
        self._mon.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name=f"guard-{name}", daemon=True)
        self._thread.start()

    def counts(self) -> tuple[int, dict[str, int]]:
        """Connections held now, in all and by peer address (ipc ones under ``unix``)."""
        with self._lock:
            return len(self._open), dict(self._by_address)

    def close(self) -> None:
        """Stop watching (before the socket's context is terminated)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        next_sweep = time.monotonic() + GUARD_SWEEP
        try:
            while not self._stop.is_set():
                try:
                    if self._mon.poll(200):
                        while True:
                            try:
                                event = monitor.recv_monitor_message(self._mon, zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            self._event(event["event"], event["value"], event["endpoint"])
                    if time.monotonic() >= next_sweep:
                        next_sweep = time.monotonic() + GUARD_SWEEP
                        self.sweep()
                except zmq.ContextTerminated:
                    return
                except Exception:  # noqa: BLE001  # the guard must keep watching
                    _log.exception("connection_guard_error", socket=self.name)
                    time.sleep(0.1)
        finally:
            self._mon.close(linger=0)

    def _event(self, kind: int, fd: int, endpoint: bytes | str) -> None:
        if kind == zmq.EVENT_DISCONNECTED:
            with self._lock:
                self._forget(fd)
        elif kind == zmq.EVENT_ACCEPTED:
            where = endpoint.decode("utf-8", "replace") if isinstance(endpoint, bytes) else endpoint
            self._accepted(fd, where)

    def _forget(self, fd: int) -> None:
        entry = self._open.pop(fd, None)
        if entry is not None:
            self._by_address[entry[0]] -= 1
            if self._by_address[entry[0]] <= 0:
                del self._by_address[entry[0]]

    def _accepted(self, fd: int, endpoint: str) -> None:
        dup, ends = _peer(fd)
        if dup is None:
            return  # (gone already: its DISCONNECTED follows)
        try:
            if not _ours(endpoint, ends[0]):
                return  # (closed meanwhile, the number taken by another socket of the agent)
            peer = ends[1]
            address = str(peer[0]) if isinstance(peer, tuple) else "unix"
            with self._lock:
                self._forget(fd)  # (a DISCONNECTED lost: the descriptor is a new connection)
                why, count = "", 0
                if len(self._open) >= self.total:
                    why, count = f"more than {self.total} connections in all", len(self._open)
                elif address != "unix" and self._by_address[address] >= self.per_address:
                    why = f"more than {self.per_address} connections from {address}"
                    count = self._by_address[address]
                if not why:
                    self._open[fd] = (address, ends)
                    self._by_address[address] += 1
                    return
                self.refused += 1
            with contextlib.suppress(OSError):  # (gone meanwhile)
                dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()
        if self.on_refused is not None:
            self.on_refused(address, why, count + 1)

    def sweep(self) -> None:
        """Drop the entries whose descriptor is no longer the connection counted."""
        with self._lock:
            entries = list(self._open.items())
        for fd, (_, ends) in entries:
            dup, now = _peer(fd)
            if dup is not None:
                dup.close()
            if now != ends:
                with self._lock:
                    if self._open.get(fd, (None, None))[1] == ends:
                        self._forget(fd)


def user_id(frame: zmq.Frame) -> str | None:
    """The authenticated client key of a received message; None if ZAP did not run."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None


def _named(z85_key: bytes) -> str | None:
    """A Z85 CURVE key as ferry writes keys (``ferry-pk:x25519:<key id>:…``), as in the
    allow-list files and the output of ``ferry keygen``; None if it is not one."""
    try:
        return PublicKey("x25519", bytes(z85.decode(z85_key))).to_string()
    except (ValueError, FerryError):
        return None


# Throwaway keys of this process's start-up self-tests, in Z85: their refusal is expected, and
# not recorded as a stranger's (api.auth_failed).
_SELF_TEST_KEYS: set[str] = set()
_SELF_TEST_LOCK = threading.Lock()


def check_rejects_strangers(endpoint: str, server: PublicKey, timeout: float = 5.0) -> None:
    """Start-up self-test: a throwaway key must fail the CURVE handshake.

    Catches the misconfigurations where ZAP is skipped (empty domain, missing
    authenticator) and every key gets in. Raises SelfTestError otherwise. The refusal is
    logged ``self_test_refused``, not as a stranger's handshake.
    """
    ctx: zmq.Context[Any] = zmq.Context.instance()
    stranger = SecretKey.generate("x25519")
    own = z85_public(stranger.public).decode("ascii")
    with _SELF_TEST_LOCK:
        _SELF_TEST_KEYS.add(own)
    sock = curve_client(ctx, zmq.DEALER, stranger, server)
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not mon.poll(int(left * 1000)):
                break
            event = monitor.recv_monitor_message(mon)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                raise SelfTestError(
                    f"{endpoint}: an unknown CURVE key was let in; the API refuses to run open"
                )
        raise SelfTestError(f"{endpoint}: no answer to the CURVE self-test within {timeout} s")
    finally:
        sock.disable_monitor()
        mon.close(0)
        sock.close(0)
        with _SELF_TEST_LOCK:
            _SELF_TEST_KEYS.discard(own)
