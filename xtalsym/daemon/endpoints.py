"""The daemon's default endpoints and topics, importable without the daemon's extra
dependencies (the command line lists them in its help before ZeroMQ is imported)."""

from __future__ import annotations

DEFAULT_INGEST_ADDRESS = "tcp://127.0.0.1:31001"  # DECTRIS detectors bind PUSH on 31001
DEFAULT_PUBLISH_ADDRESS = "tcp://127.0.0.1:5556"
DEFAULT_TOPIC = "xtalsym.prediction"
METRICS_TOPIC = "xtalsym.metrics"
DEFAULT_METRICS_ADDRESS = "127.0.0.1"  # HTTP metrics/health: loopback unless configured
DEFAULT_METRICS_PORT = 9855
