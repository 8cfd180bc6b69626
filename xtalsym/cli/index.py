"""Index commands: `index build|query|evaluate`, the reference index from the command line.

The model comes from a training checkpoint (``--checkpoint``) or a model bundle
(``--bundle``, when :mod:`xtalsym.bundle` is installed); torch and FAISS are imported
only when a command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xtalsym.cli import options


def _model_args(parser: argparse.ArgumentParser, *, default_bundle: bool = False) -> None:
    options.model_source(parser, required=not default_bundle, device_for="--checkpoint")
    parser.add_argument("--batch-size", type=int, default=32, help="materials per forward pass (default %(default)s)")
    parser.add_argument(
        "--gpu",
        choices=("auto", "on", "off"),
        default="auto",
        help="FAISS on the GPU: auto (when FAISS has GPU support), on (required), off",
    )
    parser.add_argument("--threads", type=int, default=0, help="FAISS/torch CPU threads (default: library default)")


def _kind_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind",
        choices=("flat", "hnsw", "ivf", "pq"),
        default="flat",
        help="flat: exact inner product (default); hnsw / ivf: approximate, for very large sets; "
        "pq: product-quantised (96 bytes per material), for compact shipped indexes",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="index parameter: hnsw m, ef_construction, ef_search; ivf nlist, nprobe; pq m, nbits (repeatable)",
    )


def register(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser("index", help="reference index: nearest materials, open-set matching")
    sub = index.add_subparsers(dest="index_command", metavar="WHAT", required=True)

    build = sub.add_parser(
        "build",
        help="embed references and write an index directory",
        description="Embed materials (stored shaped DPs of a dataset, or structures simulated "
        "and shaped on the fly with the model's settings) and write a FAISS reference index.",
    )
    _model_args(build)
    options.dataset_or_structures(build)
    build.add_argument("--split", default="all", help="dataset split(s), comma-separated, or all (default %(default)s)")
    build.add_argument("--space-groups", help="only these space groups, e.g. 1-230 or 3,69,76")
    build.add_argument("--real-only", action="store_true", help="leave out random (pyxtal) crystals")
    build.add_argument("--out", required=True, help="index directory to write")
    _kind_args(build)
    build.add_argument(
        "--temperature", type=float, default=None, help="softmax temperature of the per-class gamma (default 0.1)"
    )
    build.add_argument(
        "--calibration",
        metavar="METRICS_JSON",
        help="take the unknown thresholds from `xtalsym index evaluate`'s metrics.json",
    )
    build.add_argument("--tau-p", type=float, help="unknown threshold on the classifier's max probability, 0-1")
    build.add_argument(
        "--tau-s", type=float, help="unknown threshold on the nearest similarity, the sum of 3 cosines, 0-3"
    )
    build.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    options.no_progress(build)
    build.set_defaults(handler=_cmd_build)

    query = sub.add_parser(
        "query", help="nearest references, vote, per-class score and unknown decision of a structure"
    )
    query.add_argument(
        "structure",
        help="structure file: CIF, POSCAR/CONTCAR, XSF, CSSR, or JSON holding a CIF or a pymatgen Structure",
    )
    _model_args(query, default_bundle=True)
    query.add_argument("--index", help="index directory (default: the bundle's index/)")
    query.add_argument("--k", type=int, default=5, help="neighbours (default %(default)s)")
    query.add_argument("--json", action="store_true", help="print the result as JSON")
    options.prior(query)
    options.no_evidence(query)
    query.set_defaults(handler=_cmd_query)

    ev = sub.add_parser(
        "evaluate",
        help="open-set matching on the paper's 30 unseen space groups (Fig. 3f)",
        description="Split the dataset's materials of the 30 open-set space groups 50/50 by material "
        "into reference and test halves, index the references, rank each test material by the "
        "neighbour vote and by the per-class score, calibrate the unknown thresholds.",
    )
    _model_args(ev)
    ev.add_argument("--dataset", required=True, metavar="DIR")
    ev.add_argument("--out", required=True, help="output folder: metrics.json and index/")
    ev.add_argument("--seed", type=int, default=0, help="seed of the reference/test hash split (default %(default)s)")
    ev.add_argument("--k", type=int, default=5, help="neighbours in the vote (default %(default)s)")
    ev.add_argument("--space-groups", help="open-set groups (default: the paper's 30)")
    ev.add_argument("--real-only", action="store_true", help="leave out random (pyxtal) crystals")
    ev.add_argument("--calibration-split", default="val", help="split of known-class materials (default %(default)s)")
    ev.add_argument("--calibration-limit", type=int, default=2000, help="at most this many known-class materials")
    ev.add_argument(
        "--max-false-unknown",
        type=float,
        help="calibrate for the best unknown recall with false-unknown rates <= this (default: balanced accuracy)",
    )
    _kind_args(ev)
    options.no_progress(ev)
    ev.set_defaults(handler=_cmd_evaluate)


# --------------------------------------------------------------------------- helpers


def _setup_threads(args) -> None:
    if args.threads and args.threads > 0:
        import faiss
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)


def _embedder(args):
    from xtalsym import index as ix

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bundle or not args.checkpoint:
        from xtalsym.bundle import default_bundle_path

        args.bundle = args.bundle or str(default_bundle_path())
        return ix.Embedder.from_bundle(args.bundle, batch_size=args.batch_size)
    from xtalsym.offline.embed import embedder_from_checkpoint
    from xtalsym.offline.evaluate import resolve_device

    return embedder_from_checkpoint(args.checkpoint, device=resolve_device(args.device), batch_size=args.batch_size)


def _fusion_model(args):
    """The bundle's model with its fusion (xtalsym.offline.evaluate.LoadedModel), or None with
    --checkpoint or for a bundle without fusion.json (then the index answers alone)."""
    if args.checkpoint:
        return None
    from xtalsym.offline import evaluate as ev

    loaded = ev.load_for_inference(bundle=args.bundle, device=args.device, prior=args.prior)
    return loaded if loaded.fusion is not None else None


def _params(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param must be KEY=VALUE, got {pair!r}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"--param {key} must be an integer, got {value!r}") from None
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    from xtalsym import index as ix

    if (out / ix.META_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an index; pass --overwrite to replace it")


def _thresholds(args):
    from xtalsym import index as ix

    th = ix.Thresholds()
    if args.calibration:
        metrics = json.loads(Path(args.calibration).read_text())
        calibrated = (metrics.get("unknown_detection") or {}).get("thresholds")
        if not calibrated:
            raise ValueError(f"{args.calibration} holds no calibrated thresholds (unknown_detection.thresholds)")
        if metrics.get("model_id") != args._model_id:
            raise ix.ModelMismatchError(
                f"{args.calibration} was calibrated with model {str(metrics.get('model_id'))[:12]}, "
                f"not this model {str(args._model_id)[:12]}"
            )
        th = ix.Thresholds.from_json(calibrated)
    if args.tau_p is not None:
        th.tau_p, th.calibrated, th.method = args.tau_p, False, "set by hand (--tau-p/--tau-s)"
    if args.tau_s is not None:
        th.tau_s, th.calibrated, th.method = args.tau_s, False, "set by hand (--tau-p/--tau-s)"
    return th


# --------------------------------------------------------------------------- commands


def _cmd_build(args: argparse.Namespace) -> int:
    from xtalsym import index as ix
    from xtalsym import spacegroups

    out = Path(args.out)
    _check_out(out, args.overwrite)
    _setup_threads(args)
    embedder = _embedder(args)
    args._model_id = embedder.model_id
    thresholds = _thresholds(args)
    progress = not args.no_progress
    if args.dataset:
        splits = None if args.split == "all" else [s.strip() for s in args.split.split(",") if s.strip()]
        groups = spacegroups.parse_list(args.space_groups) if args.space_groups else None
        samples = ix.select_samples(args.dataset, splits=splits, space_groups=groups, real_only=args.real_only)
        embedded = ix.embed_dataset(embedder, args.dataset, samples, progress=progress)
        built_from = {
            "dataset": str(args.dataset),
            "split": args.split,
            "space_groups": args.space_groups,
            "real_only": args.real_only,
        }
    else:
        from xtalsym.offline.embed import embed_structures

        embedded = embed_structures(embedder, args.structures, progress=progress)
        built_from = {"structures": [str(s) for s in args.structures]}
    if not embedded.entries:
        raise ValueError("no references to index (empty selection, or every structure failed)")
    index = ix.ReferenceIndex.build(
        embedded.vectors,
        embedded.entries,
        kind=args.kind,
        params=_params(args.param),
        model_id=embedder.model_id,
        model_source=embedder.source,
        thresholds=thresholds,
        gpu=args.gpu,
        temperature=ix.DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
        extra={"built_from": built_from, "failed": embedded.failed[:1000]},
    )
    index.save(out)
    print(
        f"indexed {len(index)} references of {len(index.classes)} space groups ({args.kind}, "
        f"{'GPU' if index.on_gpu else 'CPU'}) in {index.meta['build_seconds']:.2f} s -> {out}"
    )
    for item in embedded.failed[:10]:
        print(f"failed: {item['source']}: {item['reason']}")
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from xtalsym import index as ix

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    _setup_threads(args)
    embedder = _embedder(args)
    index_dir = args.index or (str(ix.bundle_index_dir(args.bundle)) if args.bundle else None)
    if not index_dir:
        raise ValueError("--index is required with --checkpoint")
    index = ix.ReferenceIndex.load(index_dir, expected_model_id=embedder.model_id, gpu=args.gpu)
    loaded = _fusion_model(args)
    if loaded is None:  # a checkpoint, or a bundle without fusion.json: the index's own answer
        from xtalsym.offline.embed import embed_structure

        vec, probs, labelled = embed_structure(embedder, args.structure)
        fused_result = None
    else:  # simulate once: the same patterns feed the fused answer (as `xtalsym predict`) and the index
        import numpy as np

        from xtalsym.offline import fused, structures

        labelled = structures.load_structure(args.structure, symprec=loaded.config.symprec)
        patterns = fused.simulate_structure(labelled, config=loaded.config)
        e, p = embedder(fused.model_input(patterns, config=loaded.config)[None])
        vec, probs = ix.normalise_views(e), np.asarray(p, np.float32)
        fused_result = fused.predict_patterns(
            loaded.model, loaded.fusion, patterns, config=loaded.config, use_evidence=not args.no_evidence
        )
    result = index.query(vec, probabilities=probs, classes=embedder.classes, k=args.k)[0]
    if args.json:
        payload = {"material_id": labelled.material_id, "space_group": labelled.space_group}
        if fused_result is not None:  # the keys of `xtalsym predict --json`, then the index's supporting evidence
            prediction = fused_result.prediction
            payload |= {
                "truth": prediction.truth_verdict(labelled.space_group),
                "prediction": prediction.to_json(),
                "evidence": None if fused_result.evidence is None else fused_result.evidence.to_json(),
            }
        print(json.dumps({**payload, **result.to_json()}, indent=1))
        return 0
    if fused_result is not None:
        from xtalsym.cli.train import print_fused

        print_fused(labelled, fused_result, loaded.classes, as_json=False)
        print("\nsupporting evidence from the reference index:")
    else:
        print(
            f"{labelled.material_id} {labelled.formula}: spglib space group {labelled.space_group} ({labelled.symbol})"
        )
    print("\nnearest references (similarity = sum of 3 cosines, max 3):")
    print(f"{'rank':>4} {'similarity':>10}  {'SG':>3} {'symbol':<10} {'material':<22} formula")
    for n in result.neighbours:
        print(
            f"{n['rank']:>4} {n['similarity']:>10.4f}  {n['space_group']:>3} {n['symbol']:<10} {n['material_id']:<22} {n['formula']}"
        )
    print(
        "\nvote (similarity-weighted): "
        + ", ".join(f"{v['space_group']} ({100 * v['share']:.0f}%)" for v in result.vote)
    )
    print("per-class score (3 - sigma_total) and gamma:")
    for c in result.class_scores:
        print(f"  {c['space_group']:>3} {c['symbol']:<10} {c['score']:.4f}  gamma {c['gamma']:.3f}")
    if result.classifier:
        print("classifier: " + ", ".join(f"{c['space_group']} ({c['probability']:.3f})" for c in result.classifier))
    d = result.decision
    calibrated = "" if d["thresholds"]["calibrated"] else " (thresholds not calibrated)"
    if fused_result is not None:
        calibrated += "; the answer is the fused prediction above"
    if result.unknown:
        print(
            f"\ndecision: UNKNOWN - classifier unsure (p_max {d['p_max']}) and references do not agree "
            f"(top similarity {d['top_similarity']:.3f}, vote share {d['vote_share']:.2f}){calibrated}"
        )
    else:
        print(f"\ndecision: space group {d['space_group']} by {d['by']}{calibrated}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from xtalsym import index as ix
    from xtalsym import spacegroups

    _setup_threads(args)
    embedder = _embedder(args)
    groups = spacegroups.parse_list(args.space_groups) if args.space_groups else spacegroups.PAPER_OPEN_SET_30
    metrics, index = ix.evaluate_open_set(
        embedder,
        args.dataset,
        groups=groups,
        seed=args.seed,
        k=args.k,
        kind=args.kind,
        params=_params(args.param),
        real_only=args.real_only,
        calibration_split=args.calibration_split,
        calibration_limit=args.calibration_limit,
        max_false_unknown=args.max_false_unknown,
        progress=not args.no_progress,
        gpu=args.gpu,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index.save(out / "index")
    metrics["index"] = str(out / "index")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(ix.format_open_set(metrics))
    print(f"\nmetrics: {out / 'metrics.json'}\nreference index: {out / 'index'}")
    return 0
