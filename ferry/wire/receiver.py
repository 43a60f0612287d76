"""The receiver state machine (sans-IO).

Feed it every datagram with ``receive_datagram(data, now)``, call ``tick(now)``
regularly, and act on ``pop_events()``. Invalid input raises only
:class:`~ferry.errors.WireError` (or its subclasses ``EnvelopeRejected`` and
``ReplayRejected``); the caller counts and logs them and carries on.

Order of checks for a sealed packet: magic and version, length bounds,
session known, packet number inside the replay window, AES-GCM open, then the
frame. Nothing reaches the FEC decoder unless it authenticated.

The machine never produces output for the link: the inside never transmits.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ferry.config_types import LinkParams
from ferry.crypto import suite
from ferry.crypto.keys import PublicKey, SecretKey
from ferry.errors import EnvelopeRejected, ReplayRejected, WireError
from ferry.wire import records as rec
from ferry.wire.fec import MAX_SYMBOLS_PER_BLOCK, block_count, block_layout, get_codec
from ferry.wire.replay import ReplayWindow

# Partly received objects tracked at once; more means the oldest is given up (reported lost).
MAX_ACTIVE_OBJECTS = 1024
# Bytes of undecoded symbols held in memory across all blocks (normal use needs a few MB:
# interleave x (k + r) x symbol size).
MAX_PENDING_BYTES = 256 * 1024 * 1024
# What the memory bound counts besides the symbols' bytes (measured with tracemalloc): the
# Python objects that hold a pending symbol, and a decoded block's entry in its object's
# set. A sender choosing tiny symbols or blocks would otherwise fill memory many times
# over before the bound saw it.
SYMBOL_COST = 320
BLOCK_DONE_COST = 80
# Finished object ids remembered to ignore late symbols and repeats cheaply.
MAX_FINISHED = 65_536
# Datagrams of a not-yet-announced session kept until its announcement arrives
# (one announce interval of packets at ~100k packets/s would be more; this is a cushion
# for the first announcement being lost or reordered, not a full second of traffic).
MAX_EARLY_DATAGRAMS = 4_096
MAX_EARLY_BYTES = 16 * 1024 * 1024
# Sessions kept open at once: the current one and the one before (rekey overlap).
MAX_SESSIONS = 2
# Keys of one role held at once during a key rotation: the current one and earlier ones
# still accepted (outside signing keys trusted; inside KEM keys announcements may be sealed to).
MAX_KEYS_PER_ROLE = 4


@dataclass(frozen=True)
class SessionStarted:
    epoch: int
    counter: int
    session_id: bytes
    sender_time_us: int
    params_digest: bytes
    sender_kid: bytes = b""  # the outside signing key that signed the announcement


@dataclass(frozen=True)
class HeartbeatReceived:
    heartbeat: rec.Heartbeat
    received_at: float


@dataclass(frozen=True)
class BlockDecoded:
    object_id: bytes
    object_length: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class ObjectCompleted:
    object_id: bytes
    length: int


@dataclass(frozen=True)
class ObjectLost:
    object_id: bytes
    length: int
    blocks_done: int
    blocks_total: int
    reason: str


Event = SessionStarted | HeartbeatReceived | BlockDecoded | ObjectCompleted | ObjectLost


# New announcements whose signature the receiver checks, at most (see _check_allowed): an
# Ed25519 check takes about 120 µs here, so a flood costs the receiving thread at most 12 %
# of a core; a genuine new announcement, repeated every announce_interval, finds a check
# free about ANNOUNCE_CHECKS_PER_SECOND / R of the time under a flood of R forged ones a
# second (at 20 a second, a flood of 2,000/s kept a rekey out for 83 s).
ANNOUNCE_CHECKS_PER_SECOND = 1000
ANNOUNCE_CHECKS_BURST = 2000


@dataclass
class ReceiverStats:
    datagrams: int = 0
    announces: int = 0
    symbols: int = 0
    heartbeats: int = 0
    duplicates: int = 0
    """Authenticated symbols that were not needed (block or object already done)."""
    blocks_decoded: int = 0
    blocks_recovered: int = 0
    """Blocks that needed repair symbols (some source symbol was lost)."""
    objects_completed: int = 0
    objects_lost: int = 0
    announces_unchecked: int = 0
    """New announcements refused unchecked: past ANNOUNCE_CHECKS_PER_SECOND (a flood)."""


class _Session:
    __slots__ = ("aead", "counter", "epoch", "window")

    def __init__(self, key: bytes, epoch: int, counter: int) -> None:
        self.aead = suite.PacketAead(key)
        self.window = ReplayWindow()
        self.epoch = epoch
        self.counter = counter


@dataclass
class _Object:
    params: rec.ObjectParams
    nblocks: int
    last_seen: float
    done: set[int] = field(default_factory=set)
    pending: dict[int, dict[int, bytes]] = field(default_factory=dict)


def _held(syms: dict[int, bytes]) -> int:
    """What the memory bound counts for a block's pending symbols."""
    return sum(map(len, syms.values())) + len(syms) * SYMBOL_COST


class Receiver:
    """Inside half of the link protocol."""

    def __init__(
        self,
        params: LinkParams,
        trusted_sender: PublicKey | Sequence[PublicKey],
        kem_key: SecretKey | Sequence[SecretKey],
        *,
        replay_floor: tuple[int, int] | Mapping[bytes, tuple[int, int]] = (0, 0),
        max_object_size: int = 64 * 1024**3,
        object_timeout: float = 60.0,
    ) -> None:
        """``trusted_sender``: the outside signing key, or during a rotation the current one
        first, then earlier ones still accepted; ``kem_key`` likewise for the inside's KEM
        keys. ``replay_floor``: the newest announcement seen, per sender key id (a bare pair
        is the first sender key's)."""
        senders = (trusted_sender,) if isinstance(trusted_sender, PublicKey) else trusted_sender
        kems = (kem_key,) if isinstance(kem_key, SecretKey) else kem_key
        if not senders or not kems:
            raise ValueError("at least one trusted sender key and one KEM key are needed")
        if len(senders) > MAX_KEYS_PER_ROLE or len(kems) > MAX_KEYS_PER_ROLE:
            raise ValueError(f"at most {MAX_KEYS_PER_ROLE} keys per role")
        if any(k.alg != "ed25519" for k in senders):
            raise ValueError("the trusted sender key must be an ed25519 key")
        self.params = params
        self._senders = {k.key_id: k for k in senders}
        self._current_sender = senders[0].key_id
        self._kems = {k.public.key_id: k for k in kems}
        if len(self._senders) != len(senders) or len(self._kems) != len(kems):
            raise ValueError("a key is given twice")
        floors = (
            {self._current_sender: replay_floor}
            if isinstance(replay_floor, tuple)
            else dict(replay_floor)
        )
        self._floors: dict[bytes, tuple[int, int]] = {
            kid: floors.get(kid, (0, 0)) for kid in self._senders
        }
        self._max_object = max_object_size
        self._timeout = object_timeout
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._early: deque[bytes] = deque()
        self._early_bytes = 0
        self._objects: OrderedDict[bytes, _Object] = OrderedDict()
        self._finished: OrderedDict[bytes, None] = OrderedDict()
        self._pending_bytes = 0
        self._events: deque[Event] = deque()
        self.stats = ReceiverStats()
        # (a token bucket of signature checks for new announcements: see _check_allowed)
        self._checks = float(ANNOUNCE_CHECKS_BURST)
        self._checks_at: float | None = None

    # -------------------------------------------------------------------- API
    def pop_events(self) -> list[Event]:
        out = list(self._events)
        self._events.clear()
        return out

    def mark_finished(self, object_id: bytes) -> None:
        """Tell the machine an object is already delivered (or given up): ignore its symbols."""
        self._finished[object_id] = None
        if len(self._finished) > MAX_FINISHED:
            self._finished.popitem(last=False)
        obj = self._objects.pop(object_id, None)
        if obj is not None:
            self._drop_pending(obj)

    def forget_finished(self, object_id: bytes) -> None:
        """Take a later copy of a completed object again (the first could not be kept).
        The rest of the copy it completed from (its last repair symbols) then starts an
        object: a later copy completes it, or it is reported lost at its timeout."""
        self._finished.pop(object_id, None)

    @property
    def active_objects(self) -> int:
        return len(self._objects)

    @property
    def replay_floor(self) -> tuple[int, int]:
        """The newest announcement seen from the current sender key (epoch, counter)."""
        return self._floors[self._current_sender]

    def floor_of(self, sender_kid: bytes) -> tuple[int, int]:
        """The newest announcement seen from this trusted sender key."""
        return self._floors[sender_kid]

    def receive_datagram(self, datagram: bytes, now: float) -> None:
        """Process one datagram from the link."""
        self.stats.datagrams += 1
        kind = rec.peek_type(datagram)
        if kind == rec.TYPE_SEALED:
            self._sealed(datagram, now)
        elif kind == rec.TYPE_ANNOUNCE:
            self._announce(datagram, now)
        else:
            raise WireError(f"unknown record type {kind}")

    def tick(self, now: float) -> None:
        """Report objects that saw no symbol for ``object_timeout`` seconds as lost."""
        stale = [oid for oid, o in self._objects.items() if now - o.last_seen > self._timeout]
        for oid in stale:
            self._lose(oid, "timeout")

    # --------------------------------------------------------------- announce
    def _check_allowed(self, now: float) -> bool:
        """Whether a new announcement's signature may be checked now. An outside sends a
        new one at a start, a rekey or a key change (its repeats cost nothing: they match
        the session they opened); anyone able to put datagrams on the link can forge new
        ones by the thousand, each costing a signature check on the receiving thread. Past
        ANNOUNCE_CHECKS_PER_SECOND (a burst of ANNOUNCE_CHECKS_BURST), they are refused
        unchecked: the sessions already open go on, and a genuine new announcement is
        taken at one of its repeats (every announce_interval) once the flood eases."""
        if self._checks_at is not None:
            elapsed = max(0.0, now - self._checks_at)
            self._checks = min(
                float(ANNOUNCE_CHECKS_BURST), self._checks + elapsed * ANNOUNCE_CHECKS_PER_SECOND
            )
        self._checks_at = now
        if self._checks < 1.0:
            return False
        self._checks -= 1.0
        return True

    def _announce(self, datagram: bytes, now: float) -> None:
        unverified, signed, signature = rec.decode_announce(datagram)
        known = self._sessions.get(unverified.session_id)
        if (
            known is not None
            and known.epoch == unverified.epoch
            and known.counter == unverified.counter
        ):
            return  # a repeat of the current announcement
        sender = self._senders.get(unverified.sender_kid)
        if sender is None:
            raise EnvelopeRejected(f"announce signed by unknown key {unverified.sender_kid.hex()}")
        kem = self._kems.get(unverified.recipient_kid)
        if kem is None:
            raise EnvelopeRejected(
                f"announce sealed to another inside key {unverified.recipient_kid.hex()}"
            )
        floor = self._floors[sender.key_id]
        announced = (unverified.epoch, unverified.counter)
        # The current key's newest announcement may come again with its session not open
        # here: this inside restarted while the outside kept sending. It rejoins that session
        # (else it would hear nothing until the next rekey); packets replayed into it deliver
        # nothing twice, the ledger knows each item delivered. Anything older stays refused,
        # and so does a previous key's last session.
        rejoin = announced == floor and sender.key_id == self._current_sender
        if announced < floor or (announced == floor and not rejoin):
            raise ReplayRejected(
                f"announce epoch {unverified.epoch}/{unverified.counter} is not newer than "
                f"{floor[0]}/{floor[1]}"
            )
        if (
            unverified.kem_id != suite.KEM_IDS.get(kem.alg)
            or unverified.aead_id != suite.AEAD_AES256GCM
        ):
            raise EnvelopeRejected("announce uses a suite this inside is not configured for")
        if len(unverified.wrapped_key) != suite.WRAPPED_LEN[unverified.kem_id]:
            raise EnvelopeRejected("announce wrapped key has the wrong length for its KEM")
        if not self._check_allowed(now):
            self.stats.announces_unchecked += 1
            raise EnvelopeRejected(
                f"announce not checked: over {ANNOUNCE_CHECKS_PER_SECOND} new announcements "
                "a second (a flood of forged ones?)"
            )
        suite.verify(sender, rec.ANNOUNCE_LABEL, signed, signature)
        announce = unverified  # authenticated from here on
        key = suite.unwrap_session_key(announce.wrapped_key, kem, rec.hpke_info(announce.head()))
        self.stats.announces += 1
        if announce.epoch != floor[0]:
            self._sessions.clear()  # the sender restarted: its old sessions are over
        self._floors[sender.key_id] = (announce.epoch, announce.counter)
        self._sessions[announce.session_id] = _Session(key, announce.epoch, announce.counter)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        self._events.append(
            SessionStarted(
                announce.epoch,
                announce.counter,
                announce.session_id,
                announce.sender_time_us,
                announce.params_digest,
                sender.key_id,
            )
        )
        early = [d for d in self._early if d[4:12] == announce.session_id]
        if early:
            self._early = deque(d for d in self._early if d[4:12] != announce.session_id)
            self._early_bytes = sum(map(len, self._early))
            for d in early:
                try:
                    self._sealed(d, now, early=True)
                except WireError:
                    continue  # early datagrams are best effort; errors were never counted yet

    # ----------------------------------------------------------------- sealed
    def _sealed(self, datagram: bytes, now: float, *, early: bool = False) -> None:
        session_id, pn = rec.decode_sealed_header(datagram)
        session = self._sessions.get(session_id)
        if session is None:
            if not early and len(datagram) <= self.params.packet_size:
                self._early.append(datagram)
                self._early_bytes += len(datagram)
                while self._early_bytes > MAX_EARLY_BYTES or len(self._early) > MAX_EARLY_DATAGRAMS:
                    self._early_bytes -= len(self._early.popleft())
            raise EnvelopeRejected("packet of an unknown session (kept until announced)")
        if not session.window.check(pn):
            raise ReplayRejected("packet number replayed or too old")
        header = datagram[: rec.SEALED_HEADER_LEN]
        frame = session.aead.open(pn, header, datagram[rec.SEALED_HEADER_LEN :])
        session.window.accept(pn)
        ftype = frame[0]
        if ftype == rec.FRAME_SYMBOL:
            self._symbol(frame, now)
        elif ftype == rec.FRAME_HEARTBEAT:
            self.stats.heartbeats += 1
            self._events.append(HeartbeatReceived(rec.decode_heartbeat(frame), now))
        else:
            raise WireError(f"unknown frame type {ftype}")

    def _symbol(self, frame: bytes, now: float) -> None:
        self.stats.symbols += 1
        params, b, s, payload = rec.decode_symbol(frame)
        oid = params.object_id
        if oid in self._finished:
            self.stats.duplicates += 1
            return
        obj = self._objects.get(oid)
        if obj is None:
            obj = self._new_object(params, now)
        elif obj.params != params:
            raise WireError("symbol parameters differ from earlier symbols of the object")
        obj.last_seen = now
        if b >= obj.nblocks:
            raise WireError("block index beyond the object")
        if b in obj.done:
            self.stats.duplicates += 1
            return
        _, length, k_b, r_b = block_layout(params.length, params.k, params.r, params.symbol_size, b)
        if s >= k_b + r_b:
            raise WireError("symbol index beyond the block")
        codec = get_codec(params.codec)
        if len(payload) != params.symbol_size + codec.overhead:
            raise WireError("symbol payload size mismatch")
        syms = obj.pending.setdefault(b, {})
        if s in syms:
            self.stats.duplicates += 1
            return
        syms[s] = payload
        self._pending_bytes += len(payload) + SYMBOL_COST
        if len(syms) >= k_b:
            # Decode before dropping the symbols: if decoding fails, later symbols of the
            # block can still complete it.
            data = codec.decode(syms, k_b, r_b, params.symbol_size)
            if len(data) < length:
                raise WireError("decoded block shorter than announced")
            del obj.pending[b]
            self._pending_bytes -= _held(syms) - BLOCK_DONE_COST
            obj.done.add(b)
            self.stats.blocks_decoded += 1
            if any(i not in syms for i in range(k_b)):
                self.stats.blocks_recovered += 1
            offset = b * params.k * params.symbol_size
            self._events.append(BlockDecoded(oid, params.length, offset, data[:length]))
            if len(obj.done) == obj.nblocks:
                del self._objects[oid]
                self._pending_bytes -= len(obj.done) * BLOCK_DONE_COST
                self._finish(oid)
                self.stats.objects_completed += 1
                self._events.append(ObjectCompleted(oid, params.length))
        if self._pending_bytes > MAX_PENDING_BYTES and self._objects:
            self._lose(next(iter(self._objects)), "memory bound exceeded")

    def _new_object(self, params: rec.ObjectParams, now: float) -> _Object:
        get_codec(params.codec)  # unknown codec -> WireError
        if params.length > self._max_object:
            raise WireError(f"object of {params.length} bytes exceeds the configured maximum")
        if params.k + params.r > MAX_SYMBOLS_PER_BLOCK:
            raise WireError("too many symbols per block")
        if len(self._objects) >= MAX_ACTIVE_OBJECTS:
            self._lose(next(iter(self._objects)), "too many objects in flight")
        obj = _Object(params, block_count(params.length, params.k, params.symbol_size), now)
        self._objects[params.object_id] = obj
        return obj

    def _finish(self, oid: bytes) -> None:
        self._finished[oid] = None
        if len(self._finished) > MAX_FINISHED:
            self._finished.popitem(last=False)

    def _drop_pending(self, obj: _Object) -> None:
        """Forget what ``obj`` holds (it leaves ``_objects``): its pending symbols, and
        what its decoded blocks count."""
        for syms in obj.pending.values():
            self._pending_bytes -= _held(syms)
        obj.pending.clear()
        self._pending_bytes -= len(obj.done) * BLOCK_DONE_COST
        obj.done.clear()

    def _lose(self, oid: bytes, reason: str) -> None:
        # Not marked finished: a later copy (the channel's repeat schedule) may still complete it.
        obj = self._objects.pop(oid)
        done = len(obj.done)
        self._drop_pending(obj)
        self.stats.objects_lost += 1
        self._events.append(ObjectLost(oid, obj.params.length, done, obj.nblocks, reason))
