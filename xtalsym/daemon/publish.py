"""Publish: predictions (schema ``xtalsym.prediction/1``) and metrics over ZeroMQ PUB.

Each message is two frames: the topic (UTF-8, default ``xtalsym.prediction``; metrics go
to ``xtalsym.metrics``) and a UTF-8 JSON object. The schema is documented field by field
in docs/DAEMON.md; :func:`prediction_message` is its single producer.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
import zmq

from xtalsym import spacegroups
from xtalsym.daemon.assemble import Request

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = "xtalsym.prediction/1"
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
        {"rank": r + 1, "space_group": int(classes[c]), "symbol": spacegroups.symbol(int(classes[c])),
         "crystal_system": spacegroups.crystal_system(int(classes[c])),
         "probability": round(float(probabilities[c]), 6)}
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


def prediction_message(request: Request, *, probabilities: np.ndarray, classes: list[int], model: dict,
                       open_set: dict | None, published: float | None = None) -> dict:
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
            {"axis": v.axis, "series_id": v.series_id, "series_unique_id": v.series_unique_id,
             "image_id": v.image_id, "received": v.received}
            for v in views
        ],
        "series_id": trigger.series_id,
        "image_id": trigger.image_id,
        "top": top_classes(probabilities, classes),
        "open_set": open_set,
        "model": model,
        "user_data": jsonable(trigger.user_data),
        "timestamps": {
            "received": trigger.received,
            "first_received": min(v.received for v in views),
            "published": published if published is not None else time.time(),
        },
    }


class Publisher:
    """A PUB socket (bound or connected); owned by one thread."""

    def __init__(self, context: zmq.Context, *, address: str, mode: str = "bind", topic: str = "xtalsym.prediction",
                 metrics_topic: str = "xtalsym.metrics", send_hwm: int = 10000) -> None:
        self.socket = context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, send_hwm)
        self.socket.setsockopt(zmq.LINGER, 1000)
        if mode == "bind":
            self.socket.bind(address)
        else:
            self.socket.connect(address)
        self.topic = topic.encode()
        self.metrics_topic = metrics_topic.encode()
        self.sent = 0

    @property
    def endpoint(self) -> str:
        value = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        return value.decode() if isinstance(value, bytes) else str(value)

    def send(self, message: dict, *, topic: bytes | None = None) -> None:
        if topic is None and "timestamps" in message:
            message["timestamps"]["published"] = time.time()
        body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
        self.socket.send_multipart([topic or self.topic, body])
        self.sent += 1

    def send_metrics(self, metrics: dict) -> None:
        self.send({"schema": METRICS_SCHEMA, "time": time.time(), **metrics}, topic=self.metrics_topic)

    def close(self) -> None:
        self.socket.close()
