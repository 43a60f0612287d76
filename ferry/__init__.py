"""ferry: a one-way cross-domain data exchange gateway.

The shared core: the sans-IO wire protocol (:mod:`ferry.wire`), keys and
crypto suites (:mod:`ferry.crypto`), transports (:mod:`ferry.channels`),
configuration, logging and the ``ferry`` command line.
"""

__version__ = "0.1.0"
