"""The fusion posterior (xtalsym.fusion) and its fitting (xtalsym.offline.fusion_fit)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from xtalsym import fusion, spacegroups, symmetry
from xtalsym.offline import fusion_fit

CLASSES = [2, 14, 62, 194, 216, 225]
# A small partition for the logic tests: {216, 225} cannot be told apart, every other group alone.
SETS = [[g] for g in range(1, 231) if g not in (216, 225)] + [[216, 225]]
BRAVAIS = [symmetry.bravais_lattice(g) for g in range(1, 231)]


def make_params(**overrides) -> fusion.FusionParams:
    counts = np.zeros(230)
    counts[np.array(CLASSES) - 1] = [50, 400, 300, 40, 30, 120]
    weights = {k: {"msdn": 1.0, "msdn_system": 0.0, "msdn_bravais": 0.0, "outside": -9.0, "outside_entropy": 0.5,
                   "evidence": 1.0, "evidence_top": 0.0, "prior": 0.0} for k in (1, 2, 3)}
    base = dict(classes=CLASSES, prior_counts=counts, weights=weights, temperature={1: 1.0, 2: 1.0, 3: 1.0},
                sets=SETS, bravais=BRAVAIS)
    base.update(overrides)
    return fusion.FusionParams(**base)


def logits_for(group: int, strength: float = 6.0) -> np.ndarray:
    """Per-view logits (3, C) pointing at ``group``."""
    out = np.zeros((3, len(CLASSES)))
    out[:, CLASSES.index(group)] = strength / 3
    return out


def test_posterior_is_a_distribution_over_230_groups_and_follows_the_model():
    engine = fusion.Fusion(make_params())
    post = engine.posterior(np.stack([logits_for(14), logits_for(194)]))
    assert post.shape == (2, 230)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    assert post[0].argmax() + 1 == 14 and post[1].argmax() + 1 == 194
    assert (post > 0).all()  # no group is ever impossible


def test_indistinguishable_groups_are_named_as_one_set_with_both_ranked():
    engine = fusion.Fusion(make_params())
    prediction = engine.predict(logits_for(225))
    assert prediction.best_set.members == [225, 216]
    assert prediction.best_set.label == "Fm-3m or F-43m"
    assert "cannot separate" in prediction.best_set.statement()
    assert prediction.crystal_system[0] == "cubic" and prediction.bravais_lattice[0] == "cF"
    assert len(prediction.top_groups) == 5 and len(prediction.top_sets) == 3
    assert prediction.truth_verdict(216) == "in set"
    assert prediction.truth_verdict(225) == "top-1"
    assert prediction.truth_verdict(14) == "wrong"
    data = json.loads(json.dumps(prediction.to_json()))
    assert data["set"]["label"] == "Fm-3m or F-43m" and data["decided"] is True and data["cannot_decide"] is None


def test_thin_evidence_says_cannot_decide_and_lists_candidates():
    engine = fusion.Fusion(make_params())
    prediction = engine.predict(np.zeros((3, len(CLASSES))))  # an uninformative model
    assert not prediction.decided
    assert prediction.reason and prediction.candidates
    assert sum(c.probability for c in prediction.candidates) >= fusion.CANDIDATE_MASS or \
        len(prediction.candidates) == fusion.MAX_CANDIDATES
    assert prediction.headline().startswith("cannot decide")
    assert prediction.to_json()["cannot_decide"]["candidates"]


def test_evidence_moves_mass_to_groups_outside_the_model_classes():
    engine = fusion.Fusion(make_params())
    ev = np.full(230, -30.0)
    ev[167 - 1] = 0.0  # R-3c: not among the classes
    post = engine.posterior(np.zeros((1, 3, len(CLASSES))), evidence_loglik=ev[None])[0]
    assert post.argmax() + 1 == 167
    prediction = engine.describe(post)
    assert not prediction.top_groups[0].in_model_classes


def test_views_absent_are_ignored_and_no_view_gives_the_prior():
    engine = fusion.Fusion(make_params())
    logits = logits_for(14)
    logits[1] = 0.0
    garbage = logits.copy()
    garbage[1] = 1e3  # an absent view's content must not count
    present = np.array([True, False, True])
    np.testing.assert_allclose(engine.posterior(logits[None], present[None]), engine.posterior(garbage[None], present[None]))
    none = engine.posterior(logits[None], np.zeros((1, 3), dtype=bool))[0]
    np.testing.assert_allclose(none, engine.train_prior)


def test_evidence_the_weights_ignore_is_no_evidence():
    """A view count whose fit kept no evidence (the daemon then skips combining its zones) gives
    exactly the no-evidence posterior with or without evidence, and says it used none."""
    plain = {f: 0.0 for f in fusion.FEATURES} | {"msdn": 1.0, "outside": -9.0}
    params = make_params(weights={1: plain, 2: plain | {"evidence": 1.0}, 3: plain | {"evidence_top": 2.0}},
                         weights_no_evidence={k: plain | {"msdn": 2.0} for k in (1, 2, 3)},
                         temperature_no_evidence={1: 1.5, 2: 1.0, 3: 1.0})
    engine = fusion.Fusion(params)
    assert [engine.uses_evidence(k) for k in (1, 2, 3)] == [False, True, True]
    ev = np.zeros(230)
    ev[[14 - 1, 62 - 1]] = [-40.0, 0.0]
    summed = logits_for(14).sum(axis=0)[None]
    np.testing.assert_array_equal(engine.posterior_summed(summed, 1, ev[None]), engine.posterior_summed(summed, 1))
    assert not np.allclose(engine.posterior_summed(summed, 2, ev[None]), engine.posterior_summed(summed, 2))
    one = np.array([True, False, False])
    assert engine.predict(logits_for(14), one, ev).evidence_used is False
    assert engine.predict(logits_for(14), None, ev).evidence_used is True


def test_evidence_pays_only_beyond_the_aic_penalty():
    # last session's validation fits (9 evidence weights, 3 x 1,500 samples): 1 view no, 2 views yes
    assert not fusion_fit.evidence_pays({"nll": 2.369, "samples": 4500}, {"nll": 2.370, "samples": 4500}, 9)
    assert fusion_fit.evidence_pays({"nll": 1.557, "samples": 4500}, {"nll": 1.930, "samples": 4500}, 9)
    with pytest.raises(ValueError, match="different samples"):
        fusion_fit.evidence_pays({"nll": 1.0, "samples": 10}, {"nll": 2.0, "samples": 20}, 9)


def test_prior_swap_is_bayes_rule():
    params = make_params()
    trained = fusion.Fusion(params).posterior(logits_for(62)[None])[0]
    flat = fusion.Fusion(params, prior="flat").posterior(logits_for(62)[None])[0]
    ratio = trained / fusion.training_prior(params.prior_counts)
    np.testing.assert_allclose(flat, ratio / ratio.sum(), rtol=1e-9)


def test_site_prior_file(tmp_path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"14": 10, "62": 1}))
    engine = fusion.Fusion(make_params(), prior=site)
    assert engine.prior[13] == pytest.approx(10 * engine.prior[61])
    assert engine.prior.min() > 0 and engine.prior_name.startswith("site prior")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"999": 1}', "not a space group"),
        ('{"14": -1}', "finite number >= 0"),
        ('{"14": 0}', "all weights are zero"),
        ("[1, 2]", "JSON object"),
        ("{nope", "not valid JSON"),
    ],
)
def test_bad_site_prior_is_refused_with_one_clear_line(tmp_path, content, message):
    site = tmp_path / "site.json"
    site.write_text(content)
    with pytest.raises(fusion.FusionError, match=message):
        fusion.Fusion(make_params(), prior=site)
    with pytest.raises(fusion.FusionError, match="no file"):
        fusion.Fusion(make_params(), prior=tmp_path / "missing.json")


def test_params_round_trip_and_malformed_files(tmp_path):
    params = make_params()
    path = params.save(tmp_path / "fusion.json")
    again = fusion.FusionParams.load(path)
    logits = logits_for(194)[None]
    np.testing.assert_allclose(fusion.Fusion(again).posterior(logits), fusion.Fusion(params).posterior(logits))
    data = json.loads(path.read_text())
    for broken, message in (
        ({**data, "format": "other/1"}, "format"),
        ({k: v for k, v in data.items() if k != "weights"}, "missing or malformed"),
        ({**data, "temperature": {"1": 1.0, "2": 1.0, "3": -1.0}}, "temperatures"),
        ({**data, "sets": [[1, 2]]}, "miss groups"),
        ({**data, "prior_counts": [1, 2]}, "230"),
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(fusion.FusionError, match=message):
            fusion.FusionParams.load(path)


def test_wrong_shapes_are_refused():
    engine = fusion.Fusion(make_params())
    with pytest.raises(fusion.FusionError, match="view logits"):
        engine.posterior(np.zeros((1, 3, 5)))
    with pytest.raises(fusion.FusionError, match="evidence"):
        engine.posterior(np.zeros((1, 3, len(CLASSES))), evidence_loglik=np.zeros((1, 10)))


def _synthetic(n: int, rng: np.random.Generator):
    """Materials whose noisy per-view logits point at the truth, 10 % outside the classes."""
    groups = rng.choice(CLASSES + [167, 63], size=n, p=[0.1, 0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    logits = rng.normal(0, 1.0, size=(n, 3, len(CLASSES)))
    for i, g in enumerate(groups):
        if g in CLASSES:
            logits[i, :, CLASSES.index(g)] += 1.5
    return logits, groups


@pytest.mark.slow
def test_fit_lowers_the_nll_and_calibrates():
    rng = np.random.default_rng(0)
    logits, groups = _synthetic(300, rng)
    counts = np.bincount(groups - 1, minlength=230) * 10
    tables = fusion.SymmetryTables.from_lists(SETS, BRAVAIS, cell_known=True)
    params = fusion_fit.fit(logits, groups, classes=CLASSES, counts=counts, tables=tables)
    engine = fusion.Fusion(params)
    test_logits, test_groups = _synthetic(600, np.random.default_rng(1))
    fused = fusion_fit.posterior_metrics(engine.posterior(test_logits), test_groups, tables=tables)
    raw = fusion_fit.posterior_metrics(fusion_fit.msdn_posterior(test_logits.sum(axis=1), CLASSES), test_groups,
                                       tables=tables)
    assert fused["nll"] < raw["nll"]
    assert fused["ece"] < 0.06
    # groups outside the classes now get probability: some are named at top-1
    assert fused["group_top1"] >= raw["group_top1"] - 0.01
    assert params.sets and len(params.bravais) == 230


def test_ece_of_a_calibrated_forecaster_is_small_and_of_an_overconfident_one_large():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.2, 1.0, 20000)
    correct = rng.uniform(size=conf.size) < conf
    assert fusion_fit.expected_calibration_error(conf, correct)[0] < 0.02
    assert fusion_fit.expected_calibration_error(np.ones_like(conf), correct)[0] > 0.3


@pytest.mark.slow
def test_real_symmetry_tables_hold_the_known_sets():
    tables = fusion.symmetry_tables(True)
    assert len(tables.sets) == 113
    assert tables.set_of[186 - 1] == tables.set_of[194 - 1]
    assert tables.set_of[62 - 1] != tables.set_of[33 - 1]
    assert spacegroups.crystal_system(225) == spacegroups.CRYSTAL_SYSTEMS[tables.system[225 - 1]]


def test_bundle_carries_fusion_parameters_checksummed_and_old_bundles_still_load(tmp_path, shipped_bundle_copy):
    from xtalsym.bundle import BundleError, add_fusion, load_bundle

    root = shipped_bundle_copy
    bundle = load_bundle(root)
    classes = bundle.classes
    params = make_params(classes=classes, weights={k: {f: 0.0 for f in fusion.FEATURES} | {"msdn": 1.0, "outside": -9.0}
                                                   for k in (1, 2, 3)})
    params.prior_counts = np.ones(230)
    params.fitted = {"split": "val", "per_views": {"1": {"evidence": True, "evidence_kept": False},
                                                   "2": {"evidence": True, "evidence_kept": True}, "3": {"evidence": True}},
                     "conditions": [{"misorientation_deg": 0.0}, {"misorientation_deg": 2.0}],
                     "misorientation_test": {"2": {"n": 10, "group_top1": 0.3, "set_top1": 0.4, "crystal_system": 0.5,
                                                   "group_top5": 0.6, "ece": 0.05, "decided": 0.01}}}
    if bundle.fusion_path is None:  # an old bundle: loads, and predicts with the model alone
        assert fusion.load_fusion(bundle) is None
    path = params.save(tmp_path / "fusion.json")
    add_fusion(root, path)
    bundle = load_bundle(root)
    assert bundle.fusion_path is not None and bundle.manifest["fusion"]["file"] == "fusion.json"
    assert fusion.load_fusion(bundle) is not None
    card = (root / "MODEL_CARD.md").read_text()
    assert "evidence of the zones present is weighed with 2 and 3 views (not 1: there it bought nothing" in card
    # what it was fitted on and measured on off the axes
    assert "fitted on patterns on the zone axes and 2° off them" in card
    assert "| 2° | 10 | 30.0% | 40.0% | 50.0% | 60.0% | 0.050 | 1% |" in card
    # a changed byte is refused by the manifest check
    text = (root / "fusion.json").read_text()
    (root / "fusion.json").write_text(text.replace('"decide_at": 0.5', '"decide_at": 0.6'))
    with pytest.raises(BundleError, match="fusion.json is corrupted"):
        load_bundle(root)
    (root / "fusion.json").write_text(text)
    # parameters fitted for other classes are refused
    other = make_params()
    with pytest.raises(BundleError, match="other classes"):
        add_fusion(root, other.save(tmp_path / "other.json"))


@pytest.fixture
def shipped_bundle_copy(tmp_path):
    import shutil

    from xtalsym.bundle import default_bundle_path

    root = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), root, ignore=shutil.ignore_patterns(".cache"))
    return root


def test_daemon_message_carries_the_fusion_and_listen_judges_by_the_set():
    from xtalsym.daemon.client import format_prediction, truth_verdict
    from xtalsym.daemon.publish import PREDICTION_SCHEMA

    assert PREDICTION_SCHEMA == "xtalsym.prediction/2"
    engine = fusion.Fusion(make_params())
    fused = engine.predict(logits_for(225)).to_json()
    msg = {"schema": PREDICTION_SCHEMA, "sample_id": "s:0", "status": "complete", "final": True, "closed_by": "complete",
           "axes": ["x", "y", "z"], "top": [{"space_group": 225, "symbol": "Fm-3m", "probability": 0.9}],
           "fusion": fused, "open_set": None, "user_data": {"space_group": 216},
           "timestamps": {"received": 1.0, "published": 1.01}}
    assert truth_verdict(msg, 216) == "in set"  # F-43m: the data cannot separate it from Fm-3m
    assert truth_verdict(msg, 225) == "top-1"
    assert truth_verdict(msg, 14) == "wrong"
    line = format_prediction(msg)
    assert "IN SET" in line and "Fm-3m or F-43m" in line
    old = {k: v for k, v in msg.items() if k != "fusion"}  # a /1 message or a bundle without fusion
    assert truth_verdict(old, 216) == "wrong" and truth_verdict(old, 225) == "top-1"


def test_a_product_of_experts_file_reads_as_stacked_weights_zero(tmp_path):
    """fusion.json written before the stacked features: the same posterior as with them at weight 0."""
    params = make_params()
    data = params.to_json()
    for section in ("weights",):
        for k in data[section]:
            data[section][k] = {f: v for f, v in data[section][k].items() if f not in fusion.STACKED_FEATURES}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = fusion.FusionParams.load(path)
    assert all(old.weights[k][f] == 0.0 for k in (1, 2, 3) for f in fusion.STACKED_FEATURES)
    ev = np.full((1, 230), -50.0)
    ev[0, [215, 224]] = 0.0
    logits = logits_for(225)[None]
    np.testing.assert_allclose(fusion.Fusion(old).posterior(logits, None, ev), fusion.Fusion(params).posterior(logits, None, ev))
    broken = json.loads(path.read_text())
    del broken["weights"]["3"]["evidence"]  # a product-of-experts feature stays required
    path.write_text(json.dumps(broken))
    with pytest.raises(fusion.FusionError, match="missing or malformed"):
        fusion.FusionParams.load(path)


def test_stacked_features_follow_the_evidence_and_the_msdn():
    tables = fusion.SymmetryTables.from_lists(SETS, BRAVAIS, cell_known=True)
    ev = np.full((1, 230), -np.inf)
    ev[0, 215], ev[0, 224], ev[0, 13] = 0.0, -1.0, -40.0  # F-43m best, Fm-3m 1 nat below, P2_1/c far below
    feats = fusion.feature_tensor(logits_for(225).sum(axis=0)[None], ev, classes=CLASSES, temperature=1.0,
                                  evidence_clip=20.0, log_prior_train=np.log(np.full(230, 1 / 230)), tables=tables)[0]
    col = fusion.COLUMN
    # the depth-clipped gaps: 0 at the best group, -1/depth above the depth, -1 beyond it
    assert feats[215, col["evidence_2"]] == 0.0 and feats[224, col["evidence_2"]] == pytest.approx(-0.5)
    assert feats[13, col["evidence_8"]] == -1.0 and feats[13, col["evidence_32"]] == -1.0
    # the evidence's mass on the set {216, 225} is nearly all of it: log ~ 0; on P2_1/c's set ~ -40 nats (floored)
    assert feats[215, col["evidence_set"]] == pytest.approx(0.0, abs=1e-12)
    assert feats[224, col["evidence_set"]] == feats[215, col["evidence_set"]]
    assert feats[13, col["evidence_set"]] == pytest.approx(-1.0)
    assert feats[215, col["evidence_system"]] == pytest.approx(0.0, abs=1e-12)  # both cubic
    # the MSDN points at 225: its mass on 225's set is its largest
    assert feats[224, col["msdn_set"]] == feats[:, col["msdn_set"]].max()
    # the evidence weighted by the MSDN's entropy: 0 at the best group, below zero where the evidence is against
    assert feats[215, col["evidence_x_entropy"]] == 0.0 and feats[13, col["evidence_x_entropy"]] < 0
    # no evidence: every evidence feature is zero, the MSDN ones are not
    bare = fusion.feature_tensor(logits_for(225).sum(axis=0)[None], None, classes=CLASSES, temperature=1.0,
                                 evidence_clip=20.0, log_prior_train=np.log(np.full(230, 1 / 230)), tables=tables)[0]
    assert not bare[:, [col[f] for f in fusion.EVIDENCE_FEATURES]].any()
    assert bare[:, col["msdn_set"]].min() < 0


def test_open_set_selection_is_the_index_evaluate_test_half_outside_validation():
    from xtalsym.index.open_set import reference_half
    from xtalsym.offline import fusion_data

    labels = {f"mp-{i}": {"split": ("train", "val", "test")[i % 3], "space_group": (3, 69, 14)[i % 5 % 3]}
              for i in range(300)}
    chosen = fusion_data.open_set_ids(labels, groups=spacegroups.PAPER_OPEN_SET_30)
    assert chosen  # some of the 300 qualify
    for mid, entry in labels.items():
        expected = (entry["space_group"] in (3, 69) and entry["split"] != "val" and not reference_half(mid))
        assert (mid in chosen) == expected, mid
    assert fusion_data.open_set_ids(labels, groups=[3, 69], exclude_splits=()) > chosen


def test_from_cache_recomputes_a_chunk_with_either_graph(tmp_path):
    """fusion_data --from-cache: a copy of a cache whose logits come from the fp32 or int8 graph,
    everything else unchanged; fp32 agrees with the cached logits, int8 is a different graph."""
    from xtalsym.bundle import default_bundle_path, load_bundle
    from xtalsym.offline import fusion_data
    from xtalsym.offline.evaluate import build_config_from
    from xtalsym.offline.structures import StructureRecord, shipped_structures_dir

    bundle_path = str(default_bundle_path())
    bundle = load_bundle(bundle_path)
    if getattr(bundle, "int8_onnx_path", None) is None:
        pytest.skip("the shipped bundle has no int8 graph")
    config = build_config_from({"dataset_config": bundle.settings["dataset_config"]})
    records = tuple(StructureRecord("cif", name, None, cif=(shipped_structures_dir() / f"{name}.cif").read_text())
                    for name in ("NaCl", "Si"))
    src = tmp_path / "src"
    src.mkdir()
    _, ok, failed, _ = fusion_data.run_job(fusion_data.Job(0, "test", records), str(src), bundle_path, config)
    assert (ok, failed) == (2, 0)
    worst, share = fusion_data.relogit_cache(src, tmp_path / "fp32", bundle_path=bundle_path, precision="fp32")
    assert worst < 0.5 and 0.0 <= share <= 1.0  # float16 patterns: a grey level may move, little more
    worst8, _ = fusion_data.relogit_cache(src, tmp_path / "int8", bundle_path=bundle_path, precision="int8")
    assert worst8 > 1e-3
    with np.load(src / "chunk-00000.npz") as a, np.load(tmp_path / "int8" / "chunk-00000.npz") as b:
        assert set(a.files) == set(b.files)
        for key in a.files:
            if key != "view_logits":
                assert np.array_equal(a[key], b[key]), key
        assert (a["view_logits"].sum(axis=1).argmax(axis=1) == b["view_logits"].sum(axis=1).argmax(axis=1)).all()
    assert json.loads((tmp_path / "int8" / "plan.json").read_text())["precision"] == "int8"
    with pytest.raises(ValueError, match="same folder"):
        fusion_data.relogit_cache(src, src, bundle_path=bundle_path)
    with pytest.raises(SystemExit):
        fusion_data.main(["--from-cache", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])


def test_misoriented_cache_tilts_each_material_reproducibly_and_refuses_mixing(tmp_path, capsys):
    """fusion_data --misorientation-deg: a chunk simulated off the zone axes (seeded by the material id,
    so a rerun gives the same patterns), different from the exact-zone chunk; a folder holding chunks of
    one misorientation refuses a run at another, and a bad value is one line, not a traceback."""
    from xtalsym.bundle import default_bundle_path, load_bundle
    from xtalsym.offline import fusion_data
    from xtalsym.offline.evaluate import build_config_from
    from xtalsym.offline.structures import StructureRecord, shipped_structures_dir

    bundle_path = str(default_bundle_path())
    config = build_config_from({"dataset_config": load_bundle(bundle_path).settings["dataset_config"]})
    records = (StructureRecord("cif", "NaCl", None, cif=(shipped_structures_dir() / "NaCl.cif").read_text()),)
    folders = {}
    for name, sigma in (("exact", 0.0), ("tilted", 1.0), ("again", 1.0)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        fusion_data.run_job(fusion_data.Job(0, "test", records), str(folders[name]), bundle_path,
                            dataclasses.replace(config, misorientation_deg=sigma))
    patterns = {k: next(fusion_data.iter_patterns(v))[2] for k, v in folders.items()}
    for axis in ("x", "y", "z"):
        assert np.array_equal(patterns["tilted"][axis], patterns["again"][axis])
        assert not np.array_equal(patterns["tilted"][axis], patterns["exact"][axis])
    from xtalsym.offline.samples import material_seed

    assert material_seed("mp-1") == material_seed("mp-1") != material_seed("mp-2")
    (folders["tilted"] / "plan.json").write_text(json.dumps({"misorientation_deg": 1.0}))
    with pytest.raises(ValueError, match="misorientation 1.0°"):
        fusion_data._check_plan(folders["tilted"], {"misorientation_deg": 0.5})
    fusion_data._check_plan(folders["tilted"], {"misorientation_deg": 1.0})  # the same conditions: resumes
    with pytest.raises(SystemExit):
        fusion_data.main(["--out", str(tmp_path / "bad"), "--misorientation-deg", "-1"])
    assert "--misorientation-deg must be" in capsys.readouterr().err


def test_off_axis_rule_withholds_the_decision_and_says_why(tmp_path):
    """fusion.json's off_axis_above: a confident answer from zones that look off their axes is not
    decided (the weights were fitted on zone axes), with the reason and a warning; below it, or
    without a score, or with a file that has no rule, the answer is as before."""
    strong, flat = logits_for(194, strength=30.0), np.zeros(230)
    plain = fusion.Fusion(make_params()).predict(strong, evidence_loglik=flat)
    assert plain.decided
    engine = fusion.Fusion(make_params(off_axis_above=0.2))
    for score in (None, 0.1, 0.2):
        assert engine.predict(strong, evidence_loglik=flat, off_axis=score).decided
    assert engine.predict(strong, off_axis=0.45).decided  # no evidence used: no score to go by
    gated = engine.predict(strong, evidence_loglik=flat, off_axis=0.45)
    assert not gated.decided and "off their axes" in gated.reason and "0.45 > 0.20" in gated.reason
    assert any("Friedel asymmetry 0.45" in w for w in gated.warnings)
    assert gated.candidates and gated.candidates[0].members[0] == 194
    np.testing.assert_allclose(gated.posterior, plain.posterior)  # the probabilities are unchanged
    path = make_params(off_axis_above=0.2).save(tmp_path / "fusion.json")
    assert fusion.FusionParams.load(path).off_axis_above == 0.2
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "off_axis_above"}))
    assert fusion.FusionParams.load(path).off_axis_above is None  # files written before the rule
    path.write_text(json.dumps({**data, "off_axis_above": -1}))
    with pytest.raises(fusion.FusionError, match="off_axis_above"):
        fusion.FusionParams.load(path)


def test_the_daemon_fuses_with_the_off_axis_score_of_its_evidence():
    from xtalsym.daemon.infer import fuse_batch

    engine = fusion.Fusion(make_params(off_axis_above=0.2))
    strong = logits_for(194, strength=30.0).sum(axis=0)[None]

    class Request:  # what fuse_batch reads of xtalsym.daemon.assemble.Request
        axes = ("x", "y", "z")
        evidence_skipped = None

    ev = {"group_loglik": [0.0] * 230, "decided": True, "warnings": []}
    out_on = fuse_batch(engine, [Request()], strong, np.ones((1, 3), bool), [ev | {"off_axis": 0.05}])[0]
    out_off = fuse_batch(engine, [Request()], strong, np.ones((1, 3), bool), [ev | {"off_axis": 0.6}])[0]
    assert "cannot_decide" not in out_on or not out_on["cannot_decide"]
    assert out_off["cannot_decide"] and "off their axes" in out_off["cannot_decide"]["reason"]


def test_tilt_features_scale_the_evidence_by_the_off_axis_score_and_none_reads_as_on_axis():
    tables = fusion.SymmetryTables.from_lists(SETS, BRAVAIS, cell_known=True)
    ev = np.full((2, 230), -np.inf)
    ev[:, 215], ev[:, 13] = 0.0, -40.0
    logits = np.stack([logits_for(225).sum(axis=0)] * 2)
    kwargs = dict(classes=CLASSES, temperature=1.0, evidence_clip=20.0, log_prior_train=np.log(np.full(230, 1 / 230)),
                  tables=tables)
    feats = fusion.feature_tensor(logits, ev, off_axis=np.array([0.5, 3.0]), **kwargs)
    col = fusion.COLUMN
    assert feats[0, 13, col["evidence_x_tilt"]] == pytest.approx(0.5 * feats[0, 13, col["evidence"]])
    # scores beyond the cap count as the cap; the MSDN term is scaled the same way
    assert feats[1, 13, col["evidence_x_tilt"]] == pytest.approx(fusion.TILT_CAP * feats[1, 13, col["evidence"]])
    assert feats[0, 224, col["msdn_x_tilt"]] == pytest.approx(0.5 * feats[0, 224, col["msdn"]])
    assert feats[0, 13, col["evidence_set_x_tilt2"]] == pytest.approx(0.25 * feats[0, 13, col["evidence_set"]])
    for missing in (None, np.array([np.nan, np.nan])):
        bare = fusion.feature_tensor(logits, ev, off_axis=missing, **kwargs)
        assert not bare[:, :, [col[f] for f in fusion.TILT_FEATURES]].any()
    # a fusion with tilt weights: not measured is the same answer as on the axis, a tilt moves it
    weights = {k: make_params().weights[k] | {"evidence_x_tilt": -1.0, "msdn_x_tilt": -0.5} for k in (1, 2, 3)}
    engine = fusion.Fusion(make_params(weights=weights))
    one = logits_for(225)[None]
    np.testing.assert_allclose(engine.posterior(one, None, ev[:1]), engine.posterior(one, None, ev[:1], np.zeros(1)))
    assert not np.allclose(engine.posterior(one, None, ev[:1]), engine.posterior(one, None, ev[:1], np.ones(1)))


@pytest.mark.slow
def test_a_fit_on_tilted_samples_learns_to_trust_the_evidence_less_as_the_zones_tilt():
    """Evidence right on the axis and pointing at a random group off it: the fitted tilt weight on
    the evidence is negative, and the tilted samples' NLL falls against a fit without the score."""
    rng = np.random.default_rng(3)
    logits, groups = _synthetic(600, rng)
    tilt = np.where(np.arange(600) % 2 == 0, 0.0, 1.0)
    evidence = np.full((600, 230), -30.0)
    pointed = np.where(tilt == 0, groups, rng.choice(CLASSES, size=600))
    evidence[np.arange(600), pointed - 1] = 0.0
    masks = {tuple(bool(v) for v in m): evidence for k in (1, 2, 3) for m in fusion_fit.SUBSETS[k]}
    tilts = {m: tilt for m in masks}
    counts = np.bincount(groups - 1, minlength=230) * 10
    tables = fusion.SymmetryTables.from_lists(SETS, BRAVAIS, cell_known=True)
    fit_args = dict(classes=CLASSES, counts=counts, tables=tables, evidence=masks, evidence_clip=20.0,
                    fit_no_evidence=False, views=(3,))
    with_tilt = fusion_fit.fit(logits, groups, off_axis=tilts, **fit_args)
    without = fusion_fit.fit(logits, groups, **fit_args)
    assert with_tilt.weights[3]["evidence_x_tilt"] < 0 or with_tilt.weights[3]["evidence_32_x_tilt"] < 0
    assert all(without.weights[3][f] == 0.0 for f in fusion.TILT_FEATURES)
    assert with_tilt.fitted["per_views"]["3"]["nll"] < without.fitted["per_views"]["3"]["nll"]
