"""The pure, sans-IO protocol core: records, FEC, framing, pacing and the two state machines.

Nothing in this package touches sockets, files, clocks or randomness: time
and random bytes are parameters. See docs/PROTOCOL.md for the byte layouts.
"""
