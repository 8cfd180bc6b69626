"""Publish: predictions (schema ``xtalsym.prediction/2``) and metrics over ZeroMQ PUB.

Each message is two frames: the topic (UTF-8, default ``xtalsym.prediction``; metrics go
to ``xtalsym.metrics``) and a UTF-8 JSON object. The schema is documented field by field
in docs/DAEMON.md; :func:`prediction_message` is its single producer.

A PUB socket never blocks the pipeline: a subscriber that does not keep up loses messages
beyond ``send_hwm`` (ZeroMQ drops them silently, per subscriber). Every prediction carries
``seq`` (0, 1, 2... per daemon process) so that a subscriber can count what it missed.
Optional CURVE (:func:`curve_server`): encryption, and only subscribers whose public
certificate is in ``curve_public_keys_dir`` get in.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from xtalsym import spacegroups
from xtalsym.daemon.assemble import Request

log = logging.getLogger(__name__)

# /2 (issue 15): adds "fusion", the calibrated 230-group prediction (indistinguishable set,
# top groups and sets, crystal system, Bravais lattice, cannot decide); "top" is unchanged.
PREDICTION_SCHEMA = "xtalsym.prediction/2"
METRICS_SCHEMA = "xtalsym.metrics/1"
TOP_K = 5


def jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON types only (numpy scalars/arrays summarised, NaN -> None)."""
    if depth > 20:
        return None
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    if isinstance(value, np.ndarray):
        return {"array": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    return str(value)


def top_classes(probabilities: np.ndarray, classes: list[int], k: int = TOP_K) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {
            "rank": r + 1,
            "space_group": int(classes[c]),
            "symbol": spacegroups.symbol(int(classes[c])),
            "crystal_system": spacegroups.crystal_system(int(classes[c])),
            "probability": round(float(probabilities[c]), 6),
        }
        for r, c in enumerate(order)
    ]


def open_set_result(query) -> dict:
    """The schema's ``open_set`` object from an :class:`xtalsym.index.QueryResult`."""
    keep = ("material_id", "formula", "space_group", "symbol", "crystal_system", "similarity")
    return {
        "unknown": bool(query.unknown),
        "space_group": query.decision.get("space_group"),
        "by": query.decision.get("by"),
        "top_similarity": query.decision.get("top_similarity"),
        "vote_share": query.decision.get("vote_share"),
        "neighbours": [{k: n.get(k) for k in keep} for n in query.neighbours],
        "vote": jsonable(query.vote[:TOP_K]),
    }


def evidence_partial(frames: dict) -> dict:
    """The ``evidence`` object of a partial (non-final) prediction: per-zone evidence only."""
    return {
        "schema": "xtalsym.evidence/1",
        "partial": True,
        "zones": {axis: ev.to_json() for axis, ev in sorted(frames.items())},
    }


def prediction_message(
    request: Request,
    *,
    probabilities: np.ndarray,
    classes: list[int],
    model: dict,
    open_set: dict | None,
    published: float | None = None,
    evidence: dict | None = None,
    fused: dict | None = None,
) -> dict:
    views = [request.views[a] for a in request.axes]
    trigger = request.trigger
    return {
        "schema": PREDICTION_SCHEMA,
        "sample_id": request.sample_key,
        "status": request.status,
        "final": request.final,
        "closed_by": request.closed_by,
        "axes": request.axes,
        "frames": [
            {
                "axis": v.axis,
                "series_id": v.series_id,
                "series_unique_id": v.series_unique_id,
                "image_id": v.image_id,
                "received": v.received,
            }
            for v in views
        ],
        "series_id": trigger.series_id,
        "image_id": trigger.image_id,
        "top": top_classes(probabilities, classes),
        "fusion": fused,
        "open_set": open_set,
        "evidence": jsonable(evidence),
        "model": model,
        "user_data": jsonable(trigger.user_data),
        "timestamps": {
            "received": trigger.received,
            "first_received": min(v.received for v in views),
            "published": published if published is not None else time.time(),
        },
    }


class CurveError(ValueError):
    """A CURVE key file or directory that cannot be used (names the path)."""


def _load_certificate(path: Path, kind: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a zmq.auth certificate file; CurveError naming ``kind`` and the path."""
    import zmq.auth

    if not path.is_file():
        raise CurveError(f"CURVE {kind} certificate {str(path)!r}: no such file")
    try:
        return zmq.auth.load_certificate(path)
    except Exception as exc:  # noqa: BLE001 - zmq.auth raises ValueError/OSError on bad files
        raise CurveError(f"CURVE {kind} certificate {str(path)!r}: {exc}") from None


def load_secret_certificate(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a zmq.auth secret certificate (``*.key_secret``)."""
    path = Path(path)
    public, secret = _load_certificate(path, "secret")
    if not secret:
        raise CurveError(
            f"CURVE certificate {str(path)!r} holds no secret key (use the .key_secret file "
            "written by zmq.auth.create_certificates)"
        )
    return public, secret


def load_public_certificate(path: str | Path) -> bytes:
    return _load_certificate(Path(path), "public")[0]


def curve_server(context: zmq.Context, socket: zmq.Socket, secret_key_file: str, public_keys_dir: str):
    """Make ``socket`` a CURVE server; returns the started ThreadAuthenticator (stop it at close)."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = load_secret_certificate(secret_key_file)
    if not public_keys_dir or not Path(public_keys_dir).is_dir():
        raise CurveError(
            f"publish.curve_public_keys_dir = {public_keys_dir!r}: not a directory of the "
            "subscribers' public certificates (every subscriber must be authorised)"
        )
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(public_keys_dir))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth


def curve_client(socket: zmq.Socket, server_public_file: str, client_secret_file: str | None) -> None:
    """Make ``socket`` a CURVE client of the server whose public certificate is given."""
    socket.curve_serverkey = load_public_certificate(server_public_file)
    if client_secret_file:
        public, secret = load_secret_certificate(client_secret_file)
    else:  # an ephemeral key: encrypted, but only let in by a server that allows any client
        public, secret = zmq.curve_keypair()
    socket.curve_publickey = public
    socket.curve_secretkey = secret


class Publisher:
    """A PUB socket (bound or connected); owned by one thread. ``send`` never blocks."""

    def __init__(
        self,
        context: zmq.Context,
        *,
        address: str,
        mode: str = "bind",
        topic: str = "xtalsym.prediction",
        metrics_topic: str = "xtalsym.metrics",
        send_hwm: int = 10000,
        curve_secret_key_file: str = "",
        curve_public_keys_dir: str = "",
    ) -> None:
        self.socket = context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, send_hwm)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.auth = None
        if curve_secret_key_file:
            try:
                self.auth = curve_server(context, self.socket, curve_secret_key_file, curve_public_keys_dir)
            except Exception:
                self.socket.close(linger=0)
                raise
        if mode == "bind":
            self.socket.bind(address)
        else:
            self.socket.connect(address)
        self.topic = topic.encode()
        self.metrics_topic = metrics_topic.encode()
        self.sent = 0
        self.seq = 0  # of predictions: a subscriber sees a gap when it lost messages
        self.dropped = 0

    @property
    def endpoint(self) -> str:
        value = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        return value.decode() if isinstance(value, bytes) else str(value)

    def send(self, message: dict, *, topic: bytes | None = None) -> bool:
        """Send without blocking; False (and ``dropped`` + 1) when ZeroMQ refuses the message."""
        if topic is None and "timestamps" in message:
            message["timestamps"]["published"] = time.time()
            message["seq"] = self.seq
            self.seq += 1
        body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
        try:
            self.socket.send_multipart([topic or self.topic, body], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def send_metrics(self, metrics: dict) -> None:
        self.send({"schema": METRICS_SCHEMA, "time": time.time(), **metrics}, topic=self.metrics_topic)

    def close(self) -> None:
        self.socket.close()
        if self.auth is not None:
            self.auth.stop()
