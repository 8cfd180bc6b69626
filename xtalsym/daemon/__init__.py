"""The xtalsym daemon: detector frames in over ZeroMQ, predictions out.

Ingest decoders (pure functions over message bytes) live in
:mod:`xtalsym.daemon.protocols`.
"""
