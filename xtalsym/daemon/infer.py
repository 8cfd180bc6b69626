"""One micro-batch of assembled samples -> prediction messages: backend, open-set match, schema.

The daemon's inference thread (:meth:`xtalsym.daemon.pipeline.Pipeline._classify`) and
``xtalsym classify`` (:mod:`xtalsym.daemon.classify`) both call :func:`classify_batch`, so a
recorded frame and the same frame streamed live meet the same tensors, backend call, index
query and message producer (:func:`xtalsym.daemon.publish.prediction_message`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xtalsym.daemon.assemble import AXES, Request, View
from xtalsym.daemon.publish import evidence_partial, open_set_result, prediction_message
from xtalsym.inference.base import InferenceResult, combine_views, supports_views

log = logging.getLogger(__name__)

INDEX_QUERIES = ("final", "every")  # index.query: which predictions get the open-set match


def model_info(bundle, backend, index=None, fusion=None) -> dict:
    """The ``model`` object of the prediction schema."""
    return {
        "fusion": fusion is not None,
        "model_id": bundle.model_id,
        "name": (bundle.card or {}).get("name"),
        "backend": getattr(backend, "name", "?"),
        "device": getattr(backend, "device", "?"),
        "precision": getattr(backend, "precision", "?"),
        "classes": len(bundle.classes),
        "index": None if index is None else {"entries": len(index), "model_id": index.model_id},
    }


def uses_per_view(backend, mode: str) -> bool:
    """Whether each view runs through the network once (``pipeline.view_inference``):
    "auto" when the backend has a per-view graph, "off" never."""
    return mode == "auto" and supports_views(backend)


def infer_whole(batch: list[Request], backend, size: int) -> tuple[InferenceResult, int]:
    """The previous path: the whole graph over each request's present views (a view is
    recomputed in every request of its sample). Returns the result and the views run."""
    x = np.zeros((len(batch), 3, 3, size, size), np.uint8)
    present = np.zeros((len(batch), 3), bool)
    for i, request in enumerate(batch):
        x[i], present[i] = request.tensors(size)
    return backend.run(x, present), int(present.sum())


def infer_by_views(batch: list[Request], backend, generation: int = 0) -> tuple[InferenceResult, int]:
    """Each view through the per-view graph once: the views ``backend`` (``generation``) has
    not run yet go in one batch, their rows are kept on the View (``View.inferred``), and every
    request's logits are the sum of its views' rows (as the whole graph sums them), its
    embeddings their rows. Returns the result and the views run."""
    todo: dict[int, View] = {}
    for request in batch:
        for view in request.views.values():
            if view.inferred is None or view.inferred[0] != generation:
                todo[id(view)] = view
    if todo:
        views = list(todo.values())
        out = backend.run_views(np.stack([v.shaped.transpose(2, 0, 1) for v in views]),
                                np.array([AXES.index(v.axis) for v in views], np.int64))
        for k, view in enumerate(views):
            view.inferred = (generation, out.logits[k], out.embeddings[k])
    terms = [[r.views[a].inferred[1] if a in r.views else None for a in AXES] for r in batch]
    features = [[r.views[a].inferred[2] if a in r.views else None for a in AXES] for r in batch]
    return combine_views(terms, features, len(backend.classes)), len(todo)


@dataclass
class BatchResult:
    """The messages of one batch (in request order), or why there are none."""

    messages: list[tuple[Request, dict]] = field(default_factory=list)
    infer_seconds: float | None = None
    match_seconds: float | None = None
    infer_cpu_seconds: float | None = None  # thread CPU time of the calls (ORT at 1 thread computes here)
    match_cpu_seconds: float | None = None
    views_inferred: int = 0  # views run through the network for this batch
    inference_error: Exception | None = None  # the backend failed: no messages
    index_error: Exception | None = None  # the index failed: messages without open_set
    fuse_seconds: float | None = None
    fuse_cpu_seconds: float | None = None
    fusion_error: Exception | None = None  # the fusion failed: messages with "fusion" null
    message_seconds: float = 0.0  # building the messages (the publisher's encoding and send come after)
    message_cpu_seconds: float = 0.0
    combine_seconds: list[tuple[float, float]] = field(default_factory=list)  # (wall, thread CPU) per combine here
    evidence_errors: list[tuple[str, Exception]] = field(default_factory=list)  # messages then carry none


def evidence_frames(request: Request) -> dict:
    """The zones' FrameEvidence of a request (axis -> evidence), the views without it left out."""
    return {a: v.evidence for a, v in request.views.items() if getattr(v, "evidence", None) is not None}


def combine_timed(frames: dict) -> tuple[dict, float, float]:
    """The combined evidence of one sample's zones as the message's JSON, its wall and thread CPU
    seconds. The daemon runs it on its own thread (:meth:`Pipeline._combine_aside`): it costs
    milliseconds per sample, which on the inference thread delayed every request of the batch
    behind it."""
    from xtalsym.evidence import combine

    t0, c0 = time.perf_counter(), time.thread_time()
    out = combine(frames).to_json()
    return out, time.perf_counter() - t0, time.thread_time() - c0


def wants_combined(request: Request, fusion=None) -> bool:
    """Whether the request's zones are combined: a final one always (its message carries the
    combined evidence); a partial one when ``fusion`` weighs evidence at its number of views
    (its prediction is then fused with the combined evidence of the zones it has, as the fusion
    was fitted: issue 15). Otherwise a partial message carries the per-zone evidence only."""
    if request.final:
        return True
    return fusion is not None and fusion.uses_evidence(len(request.views))


def request_evidence(request: Request, result: BatchResult, fusion=None) -> dict | None:
    """The message's ``evidence`` object: the zones combined (for a partial prediction marked
    ``"partial": true``) when :func:`wants_combined`, else the per-zone evidence of the partial
    one. A request combined before the batch (``request.combined``: the daemon's combine thread)
    is used as it is; else it is combined here (``xtalsym classify``, shutdown), once. Never raises."""
    if request.combined is not None:
        evidence, exc = request.combined
        if exc is not None:
            result.evidence_errors.append((request.sample_key, exc))
        return evidence_object(evidence, request)
    frames = evidence_frames(request)
    if not frames:
        return None
    try:
        if not wants_combined(request, fusion):
            return evidence_partial(frames)
        out, seconds, cpu_seconds = combine_timed(frames)
        result.combine_seconds.append((seconds, cpu_seconds))
        return evidence_object(out, request)
    except Exception as exc:  # noqa: BLE001 - the evidence never costs a prediction
        log.exception("evidence of sample %s failed", request.sample_key)
        result.evidence_errors.append((request.sample_key, exc))
        return None


def evidence_object(combined: dict | None, request: Request) -> dict | None:
    """The combined evidence as a message carries it: a partial prediction's marked ``partial``
    (its ``zones`` are the per-zone objects the partial messages always carried)."""
    if combined is None or request.final:
        return combined
    return {**combined, "partial": True}


def classify_batch(batch: list[Request], *, backend, size: int, model: dict, index=None,
                   index_enabled: bool = True, neighbours: int = 5, fusion=None, per_view: bool = False,
                   generation: int = 0, index_query: str = "final") -> BatchResult:
    """Run ``backend`` on the batch, query ``index`` when given and enabled (``index_query``:
    "final" for the final predictions only, "every" for partial ones too), fuse (``fusion``: the
    bundle's :class:`xtalsym.fusion.Fusion`, or None) and build each request's
    ``xtalsym.prediction/2`` message (``seq``/``published`` are the publisher's to set).
    ``per_view``: each view once through the per-view graph (:func:`infer_by_views`,
    ``generation`` names the backend whose rows may be reused), else the whole graph with the
    present-axes mask (:func:`infer_whole`); the same probabilities within float rounding."""
    result, out = infer_batch(batch, backend=backend, size=size, per_view=per_view, generation=generation)
    if result.inference_error is not None:
        return result
    return finish_batch(batch, out, result, classes=backend.classes, model=model, index=index,
                        index_enabled=index_enabled, neighbours=neighbours, fusion=fusion, index_query=index_query)


def infer_batch(batch: list[Request], *, backend, size: int, per_view: bool = False,
                generation: int = 0) -> tuple[BatchResult, InferenceResult | None]:
    """The network part of :func:`classify_batch`: (the result with its inference timings or
    ``inference_error``, the backend's output or None). The daemon runs it on the inference
    thread and :func:`finish_batch` on the publish thread, so that the next batch's network
    runs while this one's match, fusion and messages are made."""
    result = BatchResult()
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        if per_view:
            out, result.views_inferred = infer_by_views(batch, backend, generation)
        else:
            out, result.views_inferred = infer_whole(batch, backend, size)
    except Exception as exc:
        log.exception("inference failed on a batch of %d", len(batch))
        result.inference_error = exc
        return result, None
    result.infer_seconds = time.perf_counter() - t0
    result.infer_cpu_seconds = time.thread_time() - c0
    return result, out


def finish_batch(batch: list[Request], out: InferenceResult, result: BatchResult, *, classes, model: dict,
                 index=None, index_enabled: bool = True, neighbours: int = 5, fusion=None,
                 index_query: str = "final") -> BatchResult:
    """The rest of :func:`classify_batch` after the network (``out``): the open-set match, the
    evidence, the fusion and the messages, into ``result``. Reads only ``out`` and the
    requests, never the backend (``classes``: its class list)."""
    open_sets: list[Any] = [None] * len(batch)
    if index_query not in INDEX_QUERIES:
        raise ValueError(f"index_query must be one of {', '.join(INDEX_QUERIES)}, got {index_query!r}")
    # a partial prediction is superseded within the sample's next frames: by default only the
    # final one pays for the open-set match (about a tenth of the daemon's CPU per request)
    rows = [i for i, request in enumerate(batch) if index_query == "every" or request.final]
    if index is not None and index_enabled and rows:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            from xtalsym.index.scoring import normalise_views

            queries = index.query(normalise_views(out.embeddings[rows]), probabilities=out.probabilities[rows],
                                  classes=classes, k=neighbours)
            for i, q in zip(rows, queries):
                open_sets[i] = open_set_result(q)
            result.match_seconds = time.perf_counter() - t0
            result.match_cpu_seconds = time.thread_time() - c0
        except Exception as exc:  # noqa: BLE001
            result.index_error = exc
    evidences = [request_evidence(request, result, fusion) for request in batch]
    fused: list[dict | None] = [None] * len(batch)
    if fusion is not None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            present = np.array([[axis in request.views for axis in AXES] for request in batch], bool)
            fused = fuse_batch(fusion, batch, out.logits, present, evidences)
            result.fuse_seconds = time.perf_counter() - t0
            result.fuse_cpu_seconds = time.thread_time() - c0
        except Exception as exc:  # noqa: BLE001 - the model's own answer still goes out
            result.fusion_error = exc
    t0, c0 = time.perf_counter(), time.thread_time()
    for request, probs, open_set, fused_one, evidence in zip(batch, out.probabilities, open_sets, fused, evidences):
        result.messages.append((request, prediction_message(request, probabilities=probs, classes=classes,
                                                            model=model, open_set=open_set, fused=fused_one,
                                                            evidence=evidence)))
    result.message_seconds, result.message_cpu_seconds = time.perf_counter() - t0, time.thread_time() - c0
    return result


def fuse_batch(fusion, batch: list[Request], logits: np.ndarray, present: np.ndarray,
               evidences: list[dict | None] | None = None) -> list[dict]:
    """The fusion's prediction for each request, from the summed logits of its views and the
    combined symmetry evidence of its zones (the message's ``evidence`` object, combined once by
    :func:`request_evidence` or the combine thread), final or partial; a request without
    combined evidence (a partial one the fusion weighs none for, no evidence) fuses without.
    The posteriors of the requests with and without evidence are two batched calls (per request
    they cost more than the arithmetic: ~0.1 ms each); each row is computed as alone."""
    evidences = evidences or [None] * len(batch)
    logliks: list[np.ndarray | None] = []
    for ev in evidences:
        ok = ev is not None and isinstance(ev.get("group_loglik"), list) and len(ev["group_loglik"]) == 230
        logliks.append(np.asarray(ev["group_loglik"], dtype=np.float64) if ok else None)
    logits = np.asarray(logits, dtype=np.float64)
    views = present.sum(axis=1)
    posts: list[np.ndarray | None] = [None] * len(batch)
    for with_evidence in (False, True):
        rows = [i for i, ll in enumerate(logliks) if (ll is not None) == with_evidence]
        if rows:
            # the zones' off-axis score feeds the fusion's tilt features (None: not measured)
            tilt = [evidences[i].get("off_axis") for i in rows] if with_evidence else None
            post = fusion.posterior_summed(logits[rows], views[rows],
                                           np.stack([logliks[i] for i in rows]) if with_evidence else None, tilt)
            for i, p in zip(rows, post):
                posts[i] = p
    out: list[dict] = []
    for request, ev, loglik, post, n_views in zip(batch, evidences, logliks, posts, views):
        used = loglik is not None and fusion.uses_evidence(int(n_views))  # as xtalsym predict says it
        skipped = [request.evidence_skipped] if request.evidence_skipped and not used else []
        prediction = fusion.describe(post, views=request.axes, evidence_used=used,
                                     warnings=list(ev.get("warnings", [])) if used else skipped,
                                     evidence_decided=bool(ev.get("decided", True)) if used else True,
                                     off_axis=ev.get("off_axis") if used else None)
        out.append(prediction.to_json())
    return out


def load_fusion(bundle):
    """The bundle's fusion (None for a bundle without fusion.json: the model's answer only)."""
    from xtalsym.fusion import load_fusion as load

    engine = load(bundle)
    log.info("bundle %s: %s", bundle.path, "fusion over 230 groups" if engine is not None
             else "no fusion parameters: predictions are the model's own softmax")
    return engine
