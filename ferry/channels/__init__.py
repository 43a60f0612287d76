"""Transports: thin IO adapters that move datagrams one way.

Every channel carries opaque datagrams (already sealed by :mod:`ferry.wire`).
Senders only write; receivers only read. See :mod:`ferry.channels.base`.
"""
