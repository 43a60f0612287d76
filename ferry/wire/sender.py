"""The sender state machine (sans-IO).

Drive it like h11: ``submit()`` objects, then repeatedly ask ``datagrams(now,
n)`` for up to ``n`` sealed datagrams to put on the link (pacing is the
caller's job), and ``pop_events()`` to learn which objects were fully sent.
Time (``now``, Unix seconds) and randomness (``rng(n) -> n bytes``) are
parameters; the machine never reads a clock or an entropy source itself.

Order on the wire:

* a session announcement at session start (three copies spread over the first
  packets, so one loss does not cost the session) and every
  ``announce_interval`` seconds after, so an inside that starts late joins;
* a heartbeat every ``heartbeat_interval`` seconds;
* otherwise FEC symbols, interleaved round-robin across up to ``interleave``
  active blocks (which may belong to several objects), so a burst of ``B`` lost
  packets costs each block about ``B / interleave`` symbols.

Objects have a priority (:data:`PRIORITIES`, lowest first): while any object of a
lower priority has symbols left, they go before those of higher ones. The outside
gives messages' first copies 0, their repeats 1, bulk files' first copies 2 and
their repeats 3, so a message waits at most one ``datagrams()`` batch behind a large
file, and a first copy never waits behind a backlog of repeats.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ferry.config_types import LinkParams
from ferry.crypto import suite
from ferry.crypto.keys import PublicKey, SecretKey
from ferry.errors import UsageError
from ferry.wire import records as rec
from ferry.wire.fec import CODEC_IDS, block_count, block_layout, get_codec

# AES-GCM with 96-bit deterministic nonces allows far more, but rekeying every
# 2^32 packets keeps each key's exposure small and the counter far from wrapping.
MAX_PACKETS_PER_SESSION = 1 << 32
# Extra copies of the announcement at session start, spaced this many packets apart.
ANNOUNCE_BURST = 3
ANNOUNCE_BURST_SPACING = 64


class ObjectSource(Protocol):
    """Random access to an object stream (content followed by its trailer)."""

    def read(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes at ``offset`` (fewer only at the end)."""


class BytesSource:
    """An object stream held in memory (messages, tests)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]


@dataclass(frozen=True)
class OutgoingObject:
    object_id: bytes
    length: int
    source: ObjectSource
    channel: str = ""
    seq: int = 0
    priority: int = 2
    """One of :data:`PRIORITIES`; a lower one pre-empts a higher one."""
    fec: tuple[int, int] | None = None
    """Per-object (source, repair) overriding the link's; small objects want more repair."""
    not_after: float | None = None
    """Unix seconds after which the object is not begun (a repeat held back past its
    deadline): it is dropped unsent, and :meth:`Sender.pop_dropped` names it."""


PRIORITIES = (0, 1, 2, 3)
"""Send order: 0 messages (first copies), 1 their repeats, 2 bulk files, 3 their repeats
(:func:`send_priority`)."""


def send_priority(channel_priority: int, repeat: bool) -> int:
    """The sender's priority for a copy of an item of a channel with ``channel_priority``
    (0 messages, 1 bulk files): a repeat goes after every first copy of its kind."""
    return 2 * channel_priority + (1 if repeat else 0)


@dataclass(frozen=True)
class ObjectSent:
    """Every symbol of the object has been handed out for sending."""

    object_id: bytes
    channel: str
    seq: int


def symbol_size_for(params: LinkParams) -> int:
    """Object bytes per symbol so that a symbol packet is exactly ``packet_size``."""
    codec = get_codec(CODEC_IDS[params.fec.codec])
    size = (
        params.packet_size
        - rec.SEALED_HEADER_LEN
        - suite.TAG_LEN
        - rec.SYMBOL_HEAD_LEN
        - codec.overhead
    )
    if size < 16:
        raise UsageError(f"packet_size {params.packet_size} is too small")
    return min(size, 65_535)


def build_trailer(manifest: rec.Manifest, key: SecretKey) -> bytes:
    """Sign a manifest and return the object trailer."""
    body = manifest.encode()
    return rec.encode_trailer(body, suite.sign(key, rec.MANIFEST_LABEL, body))


class _Block:
    __slots__ = ("next", "obj", "symbols")

    def __init__(self, obj: OutgoingObject, symbols: list[bytes]) -> None:
        self.obj = obj
        self.symbols = symbols
        self.next = 0


class Sender:
    """Outside half of the link protocol."""

    def __init__(
        self,
        params: LinkParams,
        signing_key: SecretKey,
        recipient: PublicKey,
        *,
        epoch: int,
        rng: Callable[[int], bytes],
        now: float,
    ) -> None:
        if recipient.alg != params.kem:
            raise UsageError(f"inside key is {recipient.alg} but link.kem is {params.kem}")
        self.params = params
        self._key = signing_key
        self._recipient = recipient
        self._rng = rng
        self.epoch = epoch
        self.session_counter = 0
        self._codec = get_codec(CODEC_IDS[params.fec.codec])
        self._symbol_size = symbol_size_for(params)
        self._digest = params.digest()
        self._queue: dict[int, deque[OutgoingObject]] = {p: deque() for p in PRIORITIES}
        self._blocks_feed: dict[int, deque[tuple[OutgoingObject, int]]] = {
            p: deque() for p in PRIORITIES
        }
        self._active: dict[int, list[_Block]] = {p: [] for p in PRIORITIES}
        self._rr = dict.fromkeys(PRIORITIES, 0)
        self._remaining: dict[bytes, int] = {}
        self._events: deque[ObjectSent] = deque()
        self._dropped: list[bytes] = []  # not begun: past their not_after
        self._now = now
        self._hb_seq = 0
        self._next_hb = now
        self.packets_sent = 0
        self.bytes_sent = 0
        self.objects_sent = 0
        self.last_seq: dict[str, int] = {}
        self._new_session(now)

    # ------------------------------------------------------------------ sessions
    def _new_session(self, now: float) -> None:
        self.session_counter += 1
        self._session_id = self._rng(8)
        key = self._rng(suite.SESSION_KEY_LEN)
        self._aead = suite.PacketAead(key)
        self._pn = 0
        self._session_start = now
        unsigned = rec.SessionAnnounce(
            sender_kid=self._key.public.key_id,
            recipient_kid=self._recipient.key_id,
            epoch=self.epoch,
            counter=self.session_counter,
            session_id=self._session_id,
            sender_time_us=int(now * 1_000_000),
            kem_id=suite.KEM_IDS[self._recipient.alg],
            aead_id=suite.AEAD_AES256GCM,
            params_digest=self._digest,
            wrapped_key=bytes(suite.WRAPPED_LEN[suite.KEM_IDS[self._recipient.alg]]),
        )
        wrapped = suite.wrap_session_key(key, self._recipient, rec.hpke_info(unsigned.head()))
        announce = rec.SessionAnnounce(**{**unsigned.__dict__, "wrapped_key": wrapped})
        signed = announce.signed_part()
        self._announce = signed + suite.sign(self._key, rec.ANNOUNCE_LABEL, signed)
        self._next_announce = now + self.params.announce_interval
        self._burst_at = [ANNOUNCE_BURST_SPACING * i for i in range(1, ANNOUNCE_BURST)]
        self._pending_announce = True

    @property
    def session_id(self) -> bytes:
        return self._session_id

    def announcement(self) -> bytes:
        """The current session announcement datagram."""
        return self._announce

    # ------------------------------------------------------------------- objects
    def submit(self, obj: OutgoingObject) -> None:
        """Queue an object; its symbols follow those already queued at its priority."""
        if obj.priority not in PRIORITIES:
            raise UsageError(f"object priority must be one of {PRIORITIES}")
        if obj.fec is not None:
            k, r = obj.fec
            if k < 1 or r < 0 or k + r > 255:
                raise UsageError("per-object FEC needs source >= 1, repair >= 0, sum <= 255")
        self._queue[obj.priority].append(obj)

    @property
    def idle(self) -> bool:
        """True when no object is queued or partly sent."""
        return not any(
            self._queue[p] or self._blocks_feed[p] or self._active[p] for p in PRIORITIES
        )

    @property
    def objects_queued(self) -> int:
        return sum(len(q) for q in self._queue.values()) + len(self._remaining)

    def _fec_of(self, obj: OutgoingObject) -> tuple[int, int]:
        return obj.fec if obj.fec is not None else (self.params.fec.source, self.params.fec.repair)

    def pop_dropped(self) -> list[bytes]:
        """Ids of the objects dropped unsent since the last call (past their not_after)."""
        out, self._dropped = self._dropped, []
        return out

    def pop_events(self) -> list[ObjectSent]:
        out = list(self._events)
        self._events.clear()
        return out

    def _refill(self, prio: int) -> None:
        depth = self.params.fec.interleave
        active, feed, queue = self._active[prio], self._blocks_feed[prio], self._queue[prio]
        while len(active) < depth:
            if not feed:
                if not queue:
                    return
                obj = queue.popleft()
                if obj.not_after is not None and self._now > obj.not_after:
                    self._dropped.append(obj.object_id)
                    continue
                nblocks = block_count(obj.length, self._fec_of(obj)[0], self._symbol_size)
                feed.extend((obj, b) for b in range(nblocks))
                self._remaining[obj.object_id] = self._remaining.get(obj.object_id, 0) + nblocks
            obj, b = feed.popleft()
            active.append(self._encode_block(obj, b))

    def _encode_block(self, obj: OutgoingObject, b: int) -> _Block:
        k, r = self._fec_of(obj)
        size = self._symbol_size
        offset, length, k_b, r_b = block_layout(obj.length, k, r, size, b)
        data = obj.source.read(offset, length)
        if len(data) != length:
            raise UsageError("object source returned fewer bytes than its length")
        data = data + bytes(k_b * size - length)
        params = rec.ObjectParams(obj.object_id, obj.length, self._codec.codec_id, k, r, size)
        symbols = self._codec.encode(data, k_b, r_b, size)
        heads = [rec.symbol_head(params, b, i) for i in range(len(symbols))]
        return _Block(obj, [h + s for h, s in zip(heads, symbols, strict=True)])

    # ----------------------------------------------------------------- datagrams
    def _seal(self, frame: bytes) -> bytes:
        header = rec.sealed_header(self._session_id, self._pn)
        datagram = header + self._aead.seal(self._pn, header, frame)
        self._pn += 1
        return datagram

    def _heartbeat(self, now: float) -> bytes:
        self._hb_seq += 1
        hb = rec.Heartbeat(
            sender_time_us=int(now * 1_000_000),
            epoch=self.epoch,
            session_counter=self.session_counter,
            sequence=self._hb_seq,
            packets_sent=self.packets_sent,
            bytes_sent=self.bytes_sent,
            objects_sent=self.objects_sent,
            objects_queued=self.objects_queued,
            params_digest=self._digest,
            interval_ms=round(self.params.heartbeat_interval * 1000),
            last_seq=self.last_seq,
        )
        return self._seal(hb.encode())

    def datagrams(self, now: float, limit: int) -> list[bytes]:
        """Up to ``limit`` datagrams to send now, control records first.

        Returns fewer (possibly none) when there is nothing more to send until
        a later ``now`` (next heartbeat or announcement).
        """
        out: list[bytes] = []
        self._now = now
        if (
            now - self._session_start >= self.params.rekey_interval
            or self._pn >= MAX_PACKETS_PER_SESSION - limit - 8
        ):
            self._new_session(now)
        if self._pending_announce or now >= self._next_announce:
            out.append(self._announce)
            self._pending_announce = False
            self._next_announce = now + self.params.announce_interval
        if now >= self._next_hb:
            out.append(self._heartbeat(now))
            self._next_hb = max(self._next_hb + self.params.heartbeat_interval, now)
        for prio in PRIORITIES:
            self._refill(prio)
        while len(out) < limit:
            for prio in PRIORITIES:
                if self._active[prio]:
                    break
            else:
                break
            active = self._active[prio]
            if self._burst_at and self._pn >= self._burst_at[0]:
                self._burst_at.pop(0)
                out.append(self._announce)
                continue
            rr = self._rr[prio]
            if rr >= len(active):
                rr = 0
            blk = active[rr]
            out.append(self._seal(blk.symbols[blk.next]))
            blk.next += 1
            if blk.next == len(blk.symbols):
                del active[rr]
                left = self._remaining[blk.obj.object_id] - 1
                if left:
                    self._remaining[blk.obj.object_id] = left
                else:
                    del self._remaining[blk.obj.object_id]
                    self._object_done(blk.obj)
                self._refill(prio)
            else:
                rr += 1
            self._rr[prio] = rr
        self.packets_sent += len(out)
        self.bytes_sent += sum(map(len, out))
        return out

    def _object_done(self, obj: OutgoingObject) -> None:
        self.objects_sent += 1
        if obj.channel:
            self.last_seq[obj.channel] = max(obj.seq, self.last_seq.get(obj.channel, 0))
        self._events.append(ObjectSent(obj.object_id, obj.channel, obj.seq))

    def next_control_due(self) -> float:
        """The time at which the next heartbeat or announcement is due."""
        return min(self._next_hb, self._next_announce)
