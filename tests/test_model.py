"""MSDN and baselines: layout, view masking, loss, resizing, checkpoints, `model info`."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

from xtalsym import model as M
from xtalsym.cli import model as model_cli

SIZE = 32  # the smallest input the DenseNets take: keeps the file fast on CPU
RESIZED = 64  # the brief's check: 224-pixel data into an input_size=64 model
C = 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these nets are tiny at SIZE: one intra-op thread is faster than OpenMP threads
    # fighting a busy machine (and leaves the cores to the other tests under xdist)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str, classes: int = C, size: int = SIZE, **options) -> M.DiffractionModel:
    return M.build_model(name, classes, input_size=size, **options).eval()


def _input(model: M.DiffractionModel, batch: int = 2, size: int | None = None) -> torch.Tensor:
    size = size or model.input_size
    shape = (batch, 3, 3, size, size) if model.representation == "shaped" else (batch, 3, size, size)
    # sparse bright pixels, like lines and spots on a dark DP
    return ((torch.rand(shape) < 0.05) * torch.randint(50, 256, shape)).to(torch.uint8)


# --------------------------------------------------------------------------- MSDN layout


def test_msdn_has_the_authors_parameter_count():
    m = M.build_model("msdn", 72)
    assert M.count_parameters(m) == 1_542_424
    assert M.count_parameters(m.trunk) == 1_542_424 - 3 * (960 * 72 + 72)
    assert len(m.heads) == 3 and all(h.in_features == M.EMBEDDING_DIM for h in m.heads)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    assert m.views == 3 and m.representation == "shaped"


def test_msdn_trunk_is_shared_and_heads_are_separate():
    m = _model("msdn")
    one = _input(m, batch=2)[:, :1]
    x = one.expand(-1, 3, -1, -1, -1).contiguous()  # the same image on every axis
    with torch.no_grad():
        before = m(x)
        assert torch.allclose(before.embeddings[:, 0], before.embeddings[:, 1])
        assert torch.allclose(before.embeddings[:, 0], before.embeddings[:, 2])
        m.heads[1].weight.add_(0.5)
        after = m(x)
    assert torch.equal(after.embeddings, before.embeddings)
    assert torch.allclose(after.view_logits[:, 0], before.view_logits[:, 0])
    assert torch.allclose(after.view_logits[:, 2], before.view_logits[:, 2])
    assert not torch.allclose(after.view_logits[:, 1], before.view_logits[:, 1])


@pytest.mark.parametrize("mask", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (1, 0, 1), (0, 1, 1)])
def test_msdn_logits_are_the_sum_of_the_present_heads(mask):
    m = _model("msdn")
    x = _input(m, batch=3)
    present = torch.tensor([mask] * 3, dtype=torch.bool)
    with torch.no_grad():
        out = m(x, present)
        full = m(x)
    assert out.logits.shape == (3, C) and out.view_logits.shape == (3, 3, C)
    assert torch.allclose(out.logits, out.view_logits.sum(dim=1), atol=1e-6)
    expected = sum(m.heads[v](full.embeddings[:, v]) for v in range(3) if mask[v])
    assert torch.allclose(out.logits, expected, atol=1e-5)
    for v in range(3):
        if mask[v]:
            assert torch.allclose(out.view_logits[:, v], full.view_logits[:, v], atol=1e-6)
        else:
            assert torch.count_nonzero(out.view_logits[:, v]) == 0
            assert torch.count_nonzero(out.embeddings[:, v]) == 0


def test_absent_view_content_does_not_matter():
    m = _model("msdn")
    x = _input(m, batch=2).float()
    present = torch.tensor([[True, False, True], [False, True, True]])
    y = x.clone()
    y[0, 1] = 255.0
    y[1, 0] = float("nan")  # even garbage in an absent view must not leak
    with torch.no_grad():
        a, b = m(x, present), m(y, present)
    assert torch.allclose(a.logits, b.logits)
    assert torch.isfinite(b.logits).all()


def test_msdn_loss_is_sum_of_view_cross_entropies():
    m = _model("msdn")
    x = _input(m, batch=4)
    target = torch.tensor([0, 1, 2, 4])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    with torch.no_grad():
        out = m(x)
    for w in (None, weight):
        expected = sum(F.cross_entropy(out.view_logits[:, v], target, weight=w) for v in range(3))
        assert torch.allclose(m.loss(out, target, weight=w), expected, atol=1e-5)
    present = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = m(x, present)
    per = F.cross_entropy(out.view_logits.reshape(12, C), target.repeat_interleave(3), reduction="none")
    expected = (per.reshape(4, 3) * present).sum(1).mean()
    assert torch.allclose(m.loss(out, target, present), expected, atol=1e-5)


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", list(M.MODELS))
def test_every_model_shapes_loss_and_backward(name):
    m = M.build_model(name, C, input_size=SIZE).train()
    x = _input(m, batch=2)
    out = m(x)
    assert isinstance(out, M.ModelOutput)
    assert out.logits.shape == (2, C)
    assert out.view_logits.shape == (2, m.views, C)
    assert out.embeddings.shape == (2, m.views, M.EMBEDDING_DIM)
    assert torch.allclose(out.logits, out.view_logits.sum(1), atol=1e-6)
    loss = m.loss(out, torch.tensor([1, 3]), weight=torch.ones(C))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list(M.MODELS))
def test_uint8_and_float_inputs_agree_and_big_inputs_are_resized(name):
    m = _model(name, size=RESIZED)
    x = _input(m, batch=2, size=224)  # dataset-sized input into an input_size=64 model
    with torch.no_grad():
        a, b = m(x), m(x.float())
    assert a.logits.shape == (2, C)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)


def test_resizing_keeps_one_pixel_lines():
    m = _model("ziletti-cnn", size=RESIZED)
    x = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    x[0, 0, 101, :] = 255  # a 1-px line survives max pooling (an average would dim it to ~1/3.5)
    assert m._prepare(x).amax() == 1.0


@pytest.mark.parametrize("name", list(M.MODELS))
def test_channels_last_gives_the_same_result(name):
    m = _model(name)
    x = _input(m, batch=2)
    with torch.no_grad():
        a = m(x).logits
        b = m.to(memory_format=torch.channels_last)(x).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_stacked_model_zeroes_absent_views():
    m = _model("densenet-stacked")
    x = _input(m, batch=1)
    y = x.clone()
    y[:, 2] = 255
    present = torch.tensor([[True, True, False]])
    with torch.no_grad():
        assert torch.allclose(m(x, present).logits, m(y, present).logits)


@pytest.mark.slow
def test_msdn_exports_with_a_dynamic_batch():
    # torch.onnx.export (dynamo) goes through torch.export: this is the part that can fail
    m = _model("msdn")
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(m, (_input(m, batch=2),), dynamic_shapes=({0: batch},))
    x = _input(m, batch=3)
    with torch.no_grad():
        exported = program.module()(x)
        assert torch.allclose(exported[0], m(x).logits, atol=1e-5)
        assert exported[2].shape == (3, 3, M.EMBEDDING_DIM)


def test_build_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="resnet"):
        M.build_model("resnet", C)
    with pytest.raises(ValueError, match="drop_rate"):
        M.build_model("msdn", C, drop_rate=0.2)
    with pytest.raises(ValueError, match="input_size"):
        M.build_model("msdn", C, input_size=16)
    with pytest.raises(ValueError, match="present"):
        _model("msdn")(_input(_model("msdn")), torch.ones(2, 2, dtype=torch.bool))
    assert M.build_model("msdn", C, input_size=SIZE, dropout=0.3).options == {"dropout": 0.3}


# --------------------------------------------------------------------------- spec and checkpoints


@pytest.mark.parametrize("name", list(M.MODELS))
def test_checkpoint_roundtrip(tmp_path, name):
    m = _model(name, dropout=0.2)
    spec = M.model_spec(m)
    assert json.loads(json.dumps(spec)) == spec
    assert spec == {"name": name, "num_classes": C, "input_size": SIZE, "options": m.options}
    path = tmp_path / "sub" / "model.pt"
    extra = {"classes": [1, 2, 4, 14, 225], "epoch": 3, "note": "x", "mean": torch.tensor([0.5])}
    M.save_checkpoint(path, m, extra=extra)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind
    loaded, got = M.load_checkpoint(path)
    assert type(loaded) is type(m) and M.model_spec(loaded) == spec and not loaded.training
    assert got["classes"] == extra["classes"] and torch.equal(got["mean"], extra["mean"])
    x = _input(m)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, m(x).logits)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a checkpoint",
        b"",
        pickle.dumps({"spec": _Evil()}),
    ],
    ids=["garbage", "empty", "pickle"],
)
def test_load_rejects_non_checkpoints(tmp_path, content, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.pt"):
        M.load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_load_rejects_torch_files_that_are_not_checkpoints(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="weights.pt"):
        M.load_checkpoint(path)
    m = _model("msdn")
    spec = M.model_spec(m)
    torch.save({"spec": {**spec, "num_classes": C + 1}, "state_dict": m.state_dict()}, path)
    with pytest.raises(ValueError, match="does not match"):
        M.load_checkpoint(path)


# --------------------------------------------------------------------------- cost and CLI


def test_msdn_multiply_adds_at_224():
    m = M.build_model("msdn", 72)
    macs = M.multiply_adds(m)
    assert 3 * 0.50e9 < macs < 3 * 0.58e9  # ≈ 0.54 GMAC per stream
    assert m.training  # mode restored


def test_model_info_command(capsys):
    parser = argparse.ArgumentParser()
    model_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["model", "info", "msdn", "--classes", "72", "--input-size", "112"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "msdn: 1,542,424 parameters" in out
    assert "GMAC" in out or "MMAC" in out
    assert "3 views × 112×112" in out and "representation: shaped" in out and "views: 3" in out
    args = parser.parse_args(["model", "info", "ziletti-cnn", "--classes", "8", "--option", "dropout=0.5"])
    assert args.handler(args) == 0
    assert '"dropout": 0.5' in capsys.readouterr().out
    args = parser.parse_args(["model", "info", "vgg", "--classes", "8"])
    with pytest.raises(ValueError, match="vgg"):
        args.handler(args)
