"""Reference index: the cosine-sum identity, exact search, persistence, class vectors,
the vote, the unknown decision, and build/query/evaluate end to end on a tiny dataset."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed")
torch = pytest.importorskip("torch", reason="torch is not installed")

from xtalsym import index as ix
from xtalsym.cli import index as index_cli
from xtalsym.offline import dataset as ds
from xtalsym.offline import embed as offline_embed
from xtalsym.offline import structures

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)

SHIPPED = structures.shipped_structures_dir()
OPEN = [3, 200]  # two of the paper's 30 open-set groups, as pyxtal crystals


def _random_embeddings(n: int, seed: int = 0, *, nonneg: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, ix.VIEWS, ix.VIEW_DIM)).astype(np.float32)
    return np.abs(e) if nonneg else e


def _entries(groups) -> list[dict]:
    return [
        {"material_id": f"m-{i}", "formula": "X", "space_group": int(g), "source": "synthetic"}
        for i, g in enumerate(groups)
    ]


# --------------------------------------------------------------------------- vectors


def test_inner_product_is_three_minus_sigma_total():
    e = _random_embeddings(6, nonneg=False) * np.array([1e-3, 1.0, 50.0], dtype=np.float32)[None, :, None]
    v = ix.normalise_views(e)
    assert v.shape == (6, ix.DIM) and v.dtype == np.float32
    for i in range(6):
        for j in range(6):
            assert float(v[i] @ v[j]) == pytest.approx(3.0 - ix.sigma_total(e[i], e[j]), abs=1e-5)
    assert np.allclose(np.linalg.norm(v.reshape(6, 3, -1), axis=2), 1.0, atol=1e-6)


def test_missing_view_is_a_zero_block_and_adds_nothing():
    e = _random_embeddings(2)
    e[0, 1] = 0.0
    v = ix.normalise_views(e)
    assert np.all(v[0, ix.VIEW_DIM : 2 * ix.VIEW_DIM] == 0)
    # sigma of the missing view is 1 (cos 0), so the score is the sum of the two others
    assert float(v[0] @ v[1]) == pytest.approx(3.0 - ix.sigma_total(e[0], e[1]), abs=1e-5)
    assert float(v[0] @ v[0]) == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ix.ReferenceIndexError, match="shape"):
        ix.normalise_views(np.zeros((2, 960)))


def test_exact_search_equals_brute_force():
    v = ix.normalise_views(_random_embeddings(300, 1, nonneg=False))
    q = ix.normalise_views(_random_embeddings(20, 2, nonneg=False))
    index = ix.ReferenceIndex.build(v, _entries(np.arange(300) % 7 + 1), gpu="off")
    sims, idx = index.search(q, 10)
    brute = q @ v.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    assert np.array_equal(idx, expected)
    assert np.allclose(sims, np.take_along_axis(brute, expected, axis=1), atol=1e-5)
    sims_all, _ = index.search(q, 10_000)  # k above the count is clipped
    assert sims_all.shape == (20, 300)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_the_exact_neighbour_of_a_stored_vector(kind):
    v = ix.normalise_views(_random_embeddings(400, 3, nonneg=False))
    index = ix.ReferenceIndex.build(
        v, _entries(np.arange(400) % 5 + 1), kind=kind, gpu="off", params={"nprobe": 64} if kind == "ivf" else None
    )
    _, idx = index.search(v[:50], 1)
    assert (idx[:, 0] == np.arange(50)).mean() >= 0.95


def test_pq_kind_is_compressed_and_ranks_like_the_exact_index(tmp_path):
    v = ix.normalise_views(_random_embeddings(2000, 3, nonneg=False))
    # queries near stored vectors: the exact neighbour must still come first
    q = ix.normalise_views((v[:50] + 0.05 * np.random.default_rng(1).normal(size=v[:50].shape)).reshape(50, 3, 960))
    pq = ix.ReferenceIndex.build(v, _entries(np.arange(2000) % 5 + 1), kind="pq", gpu="off")
    _, idx = pq.search(q, 1)
    assert (idx[:, 0] == np.arange(50)).mean() >= 0.9
    pq.save(tmp_path / "pq")
    flat = ix.ReferenceIndex.build(v, _entries(np.arange(2000) % 5 + 1), gpu="off")
    flat.save(tmp_path / "flat")
    size = lambda d: (d / ix.INDEX_FILE).stat().st_size
    # 96 bytes per vector plus the fixed codebooks (m x 256 centroids x 30 floats = 2.9 MB)
    assert size(tmp_path / "pq") < 2000 * 96 + 256 * 2880 * 4 + 100_000 < size(tmp_path / "flat") / 5
    with pytest.raises(ix.ReferenceIndexError, match="divide"):
        ix.make_faiss_index(v, "pq", {"m": 7})


def test_save_load_roundtrip_metadata_and_corruption(tmp_path):
    v = ix.normalise_views(_random_embeddings(40, 4))
    groups = [225] * 20 + [14] * 20
    th = ix.Thresholds(0.3, 2.1, calibrated=True, method="test")
    index = ix.ReferenceIndex.build(
        v, _entries(groups), model_id="a" * 64, model_source="m.pt", thresholds=th, gpu="off"
    )
    index.save(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["class_vectors.npy", "entries.jsonl", "index.faiss", "index.json"]
    back = ix.ReferenceIndex.load(tmp_path / "idx", expected_model_id="a" * 64, gpu="off")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["format"] == ix.FORMAT and meta["kind"] == "flat" and meta["dim"] == 2880 and meta["count"] == 40
    assert meta["model_id"] == "a" * 64 and meta["classes"] == [14, 225] and meta["thresholds"]["tau_p"] == 0.3
    assert back.entries[0] == {
        "material_id": "m-0",
        "formula": "X",
        "space_group": 225,
        "symbol": "Fm-3m",
        "crystal_system": "cubic",
        "source": "synthetic",
    }
    assert back.thresholds.tau_s == 2.1 and back.thresholds.calibrated
    assert np.array_equal(back.class_vectors, index.class_vectors)
    q = v[:5]
    assert np.array_equal(back.search(q, 3)[1], index.search(q, 3)[1])
    with pytest.raises(ix.ModelMismatchError, match="built with model aaaaaaaaaaaa"):
        ix.ReferenceIndex.load(tmp_path / "idx", expected_model_id="b" * 64, gpu="off")
    with open(tmp_path / "idx" / "entries.jsonl", "a") as handle:
        handle.write("{}\n")
    with pytest.raises(ix.ReferenceIndexError, match="sha256"):
        ix.ReferenceIndex.load(tmp_path / "idx", gpu="off")
    with pytest.raises(ix.ReferenceIndexError, match="not a reference index"):
        ix.ReferenceIndex.load(tmp_path / "nothing")


def test_class_vectors_are_normalised_per_view_means():
    e = _random_embeddings(6, 5)
    e[2, 0] = 0.0  # a missing view is left out of its class's mean for that view
    v = ix.normalise_views(e)
    classes, cv = ix.class_vectors(v, [5, 5, 5, 7, 7, 9])
    assert classes == [5, 7, 9]
    blocks = v.reshape(6, 3, -1)
    for c, rows in ((0, [0, 1, 2]), (1, [3, 4]), (2, [5])):
        for view in range(3):
            mean = blocks[rows, view].sum(axis=0)
            assert np.allclose(cv[c].reshape(3, -1)[view], mean / np.linalg.norm(mean), atol=1e-6)
    index = ix.ReferenceIndex.build(v, _entries([5, 5, 5, 7, 7, 9]), gpu="off")
    assert np.allclose(index.class_scores(v[:1]), v[:1] @ cv.T, atol=1e-6)


def test_gamma_is_a_softmax_that_keeps_the_ranking():
    s = np.array([[2.9, 1.0, 2.5]])
    g = ix.gamma(s, 0.1)
    assert g.sum() == pytest.approx(1.0) and np.argsort(-g[0]).tolist() == [0, 2, 1]
    assert g[0, 0] / g[0, 2] == pytest.approx(np.exp(4.0))
    assert np.allclose(ix.gamma(s, 1.0), np.exp(s) / np.exp(s).sum())


def test_vote_is_similarity_weighted():
    v = ix.vote([2.9, 2.0, 1.9, 1.8], [14, 62, 62, 14])
    assert [x["space_group"] for x in v] == [14, 62]
    assert v[0]["score"] == pytest.approx(4.7) and v[0]["share"] == pytest.approx(4.7 / 8.6, abs=1e-6)
    assert v[0]["count"] == 2 and v[1]["best_similarity"] == pytest.approx(2.0)
    tie = ix.vote([2.0, 1.5, 0.5], [20, 30, 30])  # equal weight 2.0: best single similarity wins
    assert tie[0]["space_group"] == 20
    assert ix.vote([1.0, 1.0], [-1, 5])[0]["space_group"] == 5  # missing neighbours (-1) are ignored
    assert ix.ranking_from_neighbours(np.array([2.9, 2.0, 1.9, 1.8, 1.7]), np.array([14, 62, 62, 3, 4]), 3, 5) == [
        62,
        14,
        3,
        4,
    ]


def test_unknown_rule_and_calibration_on_synthetic_scores():
    th = ix.Thresholds(tau_p=0.5, tau_s=2.0, min_share=0.5)
    p = np.array([0.9, 0.3, 0.3, 0.3, np.nan])
    s = np.array([1.0, 2.5, 1.5, 2.5, 1.0])
    share = np.array([0.2, 0.9, 0.9, 0.3, 1.0])
    assert th.is_unknown(p, s, share).tolist() == [False, False, True, True, True]
    rng = np.random.default_rng(0)
    known = {
        "p_max": rng.uniform(0.6, 1.0, 200),
        "top_similarity": rng.uniform(0.5, 1.5, 200),
        "top_share": np.full(200, 0.4),
    }
    indexed = {
        "p_max": rng.uniform(0.0, 0.4, 200),
        "top_similarity": rng.uniform(2.5, 3.0, 200),
        "top_share": np.ones(200),
    }
    unknown = {
        "p_max": rng.uniform(0.0, 0.4, 200),
        "top_similarity": rng.uniform(1.0, 2.0, 200),
        "top_share": np.ones(200),
    }
    cal = ix.calibrate(unknown, [known, indexed])
    assert cal.calibrated and 0.4 <= cal.tau_p <= 0.6 and 2.0 <= cal.tau_s <= 2.5
    assert cal.details["balanced_accuracy"] == 1.0
    strict = ix.calibrate(unknown, [known, indexed], max_false_unknown=0.0)
    assert max(strict.details["false_unknown"]) == 0.0


def test_query_results_on_synthetic_index():
    rng = np.random.default_rng(7)
    centres = np.abs(rng.normal(size=(3, 3, 960))).astype(np.float32)
    groups = np.repeat([10, 20, 30], 10)
    e = centres[np.arange(30) // 10] + 0.05 * np.abs(rng.normal(size=(30, 3, 960))).astype(np.float32)
    index = ix.ReferenceIndex.build(
        ix.normalise_views(e), _entries(groups), gpu="off", thresholds=ix.Thresholds(tau_p=0.5, tau_s=2.9)
    )
    q = ix.normalise_views(centres[[1]] + 0.05 * np.abs(rng.normal(size=(1, 3, 960))).astype(np.float32))
    probs = np.array([[0.2, 0.8]])
    r = index.query(q, probabilities=probs, classes=[1, 2], k=4)[0]
    assert [n["space_group"] for n in r.neighbours] == [20] * 4 and r.neighbours[0]["similarity"] > 2.9
    assert r.vote[0]["space_group"] == 20 and r.vote[0]["share"] == 1.0
    assert r.class_scores[0]["space_group"] == 20 and sum(c["gamma"] for c in r.class_scores) == pytest.approx(
        1.0, abs=1e-5
    )
    assert r.decision == {**r.decision, "space_group": 2, "by": "classifier"} and not r.unknown
    r2 = index.query(q, probabilities=np.array([[0.35, 0.45]]), classes=[1, 2], k=4)[0]
    assert r2.decision["by"] == "reference vote" and r2.decision["space_group"] == 20
    far = ix.normalise_views(np.abs(rng.normal(size=(1, 3, 960))).astype(np.float32))
    r3 = index.query(far, probabilities=np.array([[0.3, 0.3]]), classes=[1, 2], k=4)[0]
    assert r3.unknown and r3.decision["space_group"] is None


@pytest.mark.skipif(not ix.gpu_available(), reason="FAISS here has no GPU support (faiss-cpu) or sees no GPU")
def test_gpu_index_matches_cpu():  # pragma: no cover - needs faiss-gpu
    v = ix.normalise_views(_random_embeddings(100, 9))
    gpu = ix.ReferenceIndex.build(v, _entries(np.arange(100) % 3 + 1), gpu="on")
    cpu = ix.ReferenceIndex.build(v, _entries(np.arange(100) % 3 + 1), gpu="off")
    assert gpu.on_gpu and np.array_equal(gpu.search(v[:10], 5)[1], cpu.search(v[:10], 5)[1])


def test_gpu_on_without_gpu_is_refused():
    if ix.gpu_available():
        pytest.skip("a GPU is available")
    with pytest.raises(ix.ReferenceIndexError, match="GPU"):
        ix.ReferenceIndex.build(ix.normalise_views(_random_embeddings(3)), _entries([1, 1, 2]), gpu="on")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Shipped CIFs (known classes, half of them in val) + pyxtal crystals of two open-set
    groups, and a fresh msdn at input size 32 whose classes are the shipped groups."""
    from xtalsym import model as model_module

    root = tmp_path_factory.mktemp("index")
    data = root / "data"
    records, _ = ds.collect_records([SHIPPED])
    records += structures.random_records(OPEN, 4, seed=0)
    config = ds.BuildConfig(shard_size=8, split_fractions={"train": 0.5, "val": 0.5})
    ds.build_dataset(records, data, config=config, workers=1, progress=False)
    classes = sorted({s["space_group"] for s in ds.iter_sample_metadata(data) if s["space_group"] not in OPEN})
    torch.manual_seed(0)
    model = model_module.build_model("msdn", len(classes), input_size=32)
    ckpt = root / "msdn.pt"
    model_module.save_checkpoint(ckpt, model, extra={"classes": classes, "config": {"dataset": str(data)}})
    other = root / "other.pt"
    model_module.save_checkpoint(
        other, model_module.build_model("msdn", len(classes), input_size=32), extra={"classes": classes}
    )
    return {"data": data, "ckpt": ckpt, "other": other, "classes": classes, "root": root}


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    index_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_embedder_from_checkpoint(tiny):
    emb = offline_embed.embedder_from_checkpoint(tiny["ckpt"])
    assert emb.classes == tiny["classes"] and emb.model_id == ix.sha256_file(tiny["ckpt"])
    x = np.zeros((2, 3, 3, 224, 224), np.uint8)
    e, p = emb(x, np.array([[True, False, True]] * 2))
    assert e.shape == (2, 3, 960) and e.dtype == np.float32 and p.shape == (2, len(tiny["classes"]))
    assert np.all(e[:, 1] == 0) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    # the settings the training dataset was built with (its dataset.json) travel with the embedder
    trained = ds.load_metadata(tiny["data"])["config"]
    config = offline_embed.build_config(emb)
    assert config.to_json()["geometry"] == trained["geometry"] and config.shaping_method == trained["shaping_method"]


def test_structures_are_simulated_with_the_embedders_dataset_settings():
    def fn(x, present):
        raise AssertionError("not called")

    emb = ix.Embedder(fn, [1], None, "test", dataset_config={"geometry": {"distance_m": 0.3}, "symprec": 0.05})
    config = offline_embed.build_config(emb)
    assert config.geometry.distance_m == 0.3 and config.symprec == 0.05
    assert config.geometry.pixels == ds.BuildConfig().geometry.pixels  # the rest: defaults
    assert offline_embed.build_config(ix.Embedder(fn, [1], None, "test")) == ds.BuildConfig()


def test_cli_build_query_evaluate_end_to_end(tiny, tmp_path, capsys):
    data, ckpt = str(tiny["data"]), str(tiny["ckpt"])
    out = tmp_path / "idx"
    assert (
        _run(
            [
                "index",
                "build",
                "--checkpoint",
                ckpt,
                "--dataset",
                data,
                "--out",
                str(out),
                "--no-progress",
                "--gpu",
                "off",
            ]
        )
        == 0
    )
    meta = json.loads((out / "index.json").read_text())
    n = sum(1 for _ in ds.iter_sample_metadata(data))
    assert meta["count"] == n and meta["model_id"] == ix.sha256_file(ckpt) and meta["kind"] == "flat"
    entries = [json.loads(line) for line in (out / "entries.jsonl").read_text().splitlines()]
    assert {e["space_group"] for e in entries} >= set(OPEN) and set(entries[0]) == set(ix.ENTRY_FIELDS)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(["index", "build", "--checkpoint", ckpt, "--dataset", data, "--out", str(out), "--no-progress"])

    # a stored material queried from its structure finds itself (same simulation settings)
    cif = SHIPPED / "NaCl.cif"
    capsys.readouterr()
    assert (
        _run(
            [
                "index",
                "query",
                str(cif),
                "--checkpoint",
                ckpt,
                "--index",
                str(out),
                "--k",
                "3",
                "--json",
                "--gpu",
                "off",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["neighbours"][0]["space_group"] == 225 and result["neighbours"][0]["similarity"] == pytest.approx(
        3.0, abs=1e-3
    )
    assert len(result["neighbours"]) == 3 and len(result["class_scores"]) == 5 and result["decision"]["by"]
    assert _run(["index", "query", str(cif), "--checkpoint", ckpt, "--index", str(out), "--gpu", "off"]) == 0
    text = capsys.readouterr().out
    assert "nearest references" in text and "vote" in text and "decision:" in text

    # another model's embeddings are not comparable: refused with a clear message
    with pytest.raises(ix.ModelMismatchError, match="rebuild the index"):
        _run(["index", "query", str(cif), "--checkpoint", str(tiny["other"]), "--index", str(out)])

    # open-set evaluation on the two pyxtal groups
    ev_out = tmp_path / "ev"
    assert (
        _run(
            [
                "index",
                "evaluate",
                "--checkpoint",
                ckpt,
                "--dataset",
                data,
                "--out",
                str(ev_out),
                "--space-groups",
                ",".join(map(str, OPEN)),
                "--no-progress",
                "--gpu",
                "off",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "nearest-neighbour vote" in printed and "paper (Fig. 3f)" in printed
    metrics = json.loads((ev_out / "metrics.json").read_text())
    assert metrics["references"] + metrics["tests"] == 8 and metrics["open_set_groups"] == OPEN
    for method in ("vote", "class_score"):
        tops = [metrics[method][f"top{j}"] for j in range(1, 6)]
        assert all(0.0 <= t <= 1.0 for t in tops) and tops == sorted(tops)
        assert tops[1] == 1.0  # only two groups: the truth is always within the top 2
    unknown = metrics["unknown_detection"]
    assert unknown is not None and unknown["thresholds"]["calibrated"] and unknown["known_class_queries"] > 0
    saved = json.loads((ev_out / "index" / "index.json").read_text())
    assert saved["thresholds"] == unknown["thresholds"] and saved["count"] == metrics["references"]
    for s in ix.select_samples(data, space_groups=OPEN):  # the split is the documented hash
        in_ref = any(
            e["material_id"] == s["material_id"]
            for e in map(json.loads, (ev_out / "index" / "entries.jsonl").read_text().splitlines())
        )
        assert in_ref == ix.reference_half(s["material_id"])

    # thresholds carried into a new index from the evaluation's metrics.json
    out2 = tmp_path / "idx2"
    assert (
        _run(
            [
                "index",
                "build",
                "--checkpoint",
                ckpt,
                "--structures",
                str(SHIPPED / "Si.cif"),
                str(cif),
                "--out",
                str(out2),
                "--calibration",
                str(ev_out / "metrics.json"),
                "--kind",
                "hnsw",
                "--no-progress",
                "--gpu",
                "off",
            ]
        )
        == 0
    )
    meta2 = json.loads((out2 / "index.json").read_text())
    assert meta2["count"] == 2 and meta2["kind"] == "hnsw" and meta2["thresholds"] == unknown["thresholds"]
    with pytest.raises(ix.ModelMismatchError):
        _run(
            [
                "index",
                "build",
                "--checkpoint",
                str(tiny["other"]),
                "--structures",
                str(cif),
                "--out",
                str(tmp_path / "x"),
                "--calibration",
                str(ev_out / "metrics.json"),
                "--no-progress",
            ]
        )


def test_build_from_structures_matches_dataset_embeddings(tiny):
    emb = offline_embed.embedder_from_checkpoint(tiny["ckpt"])
    from_structures = offline_embed.embed_structures(emb, [SHIPPED / "ZnO.cif"])
    samples = [
        s for s in ix.select_samples(tiny["data"]) if s["material_id"] == from_structures.entries[0]["material_id"]
    ]
    from_dataset = ix.embed_dataset(emb, tiny["data"], samples)
    assert from_structures.entries[0] == from_dataset.entries[0]
    assert float(from_structures.vectors[0] @ from_dataset.vectors[0]) == pytest.approx(3.0, abs=1e-4)


def test_bundle_embedder_build_and_query(tiny, tmp_path, capsys):
    bundle = pytest.importorskip("xtalsym.bundle", reason="xtalsym.bundle is not available")
    release = tmp_path / "release"
    release.mkdir()
    from xtalsym import model as model_module

    model, extra = model_module.load_checkpoint(tiny["ckpt"])
    extra = {**extra, "dataset_config": ds.load_metadata(tiny["data"])["config"]}
    model_module.save_checkpoint(release / "model.pt", model, extra=extra)
    (release / "card.json").write_text("{}")
    (release / "MODEL_CARD.md").write_text("# test model\n")
    try:
        path = bundle.build_bundle(release, tmp_path / "bundle", onnx=False)
    except Exception as exc:  # the bundle builder's own requirements are its tests' business
        pytest.skip(f"could not build a test bundle: {exc}")
    emb = ix.Embedder.from_bundle(path)
    assert emb.model_id == ix.sha256_file(release / "model.pt") and emb.classes == tiny["classes"]
    idx = tmp_path / "idx"
    assert (
        _run(
            [
                "index",
                "build",
                "--bundle",
                str(path),
                "--structures",
                str(SHIPPED / "NaCl.cif"),
                "--out",
                str(idx),
                "--no-progress",
                "--gpu",
                "off",
            ]
        )
        == 0
    )
    bundle.add_index(path, idx)
    capsys.readouterr()
    assert _run(["index", "query", str(SHIPPED / "NaCl.cif"), "--bundle", str(path), "--json", "--gpu", "off"]) == 0
    assert json.loads(capsys.readouterr().out)["neighbours"][0]["space_group"] == 225
