"""Security (issue 6): nothing from the network is unpickled or evaluated; CURVE on the
prediction stream lets authorised subscribers in and keeps the others out."""

from __future__ import annotations

import ast
import threading
import time

import pytest

from xtalsym.testing import REPO_ROOT

zmq = pytest.importorskip("zmq")

DAEMON = REPO_ROOT / "xtalsym" / "daemon"
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "jsonpickle", "yaml"}
FORBIDDEN_METHODS = {"recv_pyobj", "recv_serialized", "loads_pickle"}


def _sources():
    files = sorted(DAEMON.rglob("*.py"))
    assert len(files) >= 10 and (DAEMON / "protocols" / "stream_v2.py") in files
    return [(f, ast.parse(f.read_text(), str(f))) for f in files]


def test_no_unpickling_or_eval_in_daemon_and_decoders():
    """The daemon and its decoders import no pickle-like module, call no eval/exec, never use
    pyzmq's pickling receive, and every np.load passes allow_pickle=False."""
    problems = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            where = f"{path.relative_to(DAEMON.parents[1])}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                problems.append(f"{where}: from {node.module} import")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if isinstance(func, ast.Name) and name in FORBIDDEN_CALLS:
                    problems.append(f"{where}: {name}()")
                if name in FORBIDDEN_METHODS:
                    problems.append(f"{where}: .{name}()")
                if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "np":
                    flag = [k for k in node.keywords if k.arg == "allow_pickle"]
                    if not flag or not (isinstance(flag[0].value, ast.Constant) and flag[0].value.value is False):
                        problems.append(f"{where}: np.load without allow_pickle=False")
                if name in ("loads", "load") and isinstance(func, ast.Attribute) and \
                        getattr(func.value, "id", "") == "cbor2":
                    # cbor2 has no code-executing tags, but a tag_hook/object_hook could add one
                    if any(k.arg in ("tag_hook", "object_hook") for k in node.keywords):
                        problems.append(f"{where}: cbor2 hook")
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_it_forbids(tmp_path, monkeypatch):
    """The scan above is not vacuous: a file with each forbidden use is reported."""
    bad = tmp_path / "daemon"
    (bad / "protocols").mkdir(parents=True)
    for i in range(10):
        (bad / f"m{i}.py").write_text("x = 1\n")
    (bad / "protocols" / "stream_v2.py").write_text(
        "import pickle\nimport numpy as np\nnp.load(p)\neval(s)\nsock.recv_pyobj()\n")
    monkeypatch.setattr(__import__(__name__), "DAEMON", bad)
    with pytest.raises(AssertionError) as err:
        test_no_unpickling_or_eval_in_daemon_and_decoders()
    text = str(err.value)
    assert all(s in text for s in ("import pickle", "np.load without", "eval()", ".recv_pyobj()"))


@pytest.fixture()
def certificates(tmp_path):
    import zmq.auth

    server_dir, allowed_dir, other_dir = (tmp_path / d for d in ("server", "allowed", "other"))
    for d in (server_dir, allowed_dir, other_dir):
        d.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(server_dir, "server")
    _, client_secret = zmq.auth.create_certificates(allowed_dir, "client")
    _, intruder_secret = zmq.auth.create_certificates(other_dir, "intruder")
    return {"server_public": server_public, "server_secret": server_secret, "allowed_dir": allowed_dir,
            "client_secret": client_secret, "intruder_secret": intruder_secret}


def test_curve_publisher_admits_only_authorised_subscribers(certificates):
    from xtalsym.daemon.client import listen
    from xtalsym.daemon.publish import Publisher

    ctx = zmq.Context()
    pub = Publisher(ctx, address="tcp://127.0.0.1:*", curve_secret_key_file=str(certificates["server_secret"]),
                    curve_public_keys_dir=str(certificates["allowed_dir"]))
    results, threads, stop = {}, [], threading.Event()
    plain = ctx.socket(zmq.SUB)  # no CURVE at all
    plain.setsockopt(zmq.SUBSCRIBE, b"")
    plain.connect(pub.endpoint)
    for name, key in (("allowed", certificates["client_secret"]), ("intruder", certificates["intruder_secret"])):
        def run(name=name, key=key):
            results[name] = listen(pub.endpoint, context=ctx, stop=stop, duration=4.0,
                                   curve_server_key=str(certificates["server_public"]), curve_key=str(key))
        threads.append(threading.Thread(target=run))
        threads[-1].start()
    try:
        time.sleep(1.0)  # handshakes
        for i in range(5):
            pub.send({"timestamps": {"received": time.time()}, "top": [], "final": True, "status": "complete",
                      "user_data": None, "i": i})
            time.sleep(0.05)
        plain_got = plain.poll(500)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        plain.close(linger=0)
        pub.close()
        ctx.term()
    assert results["allowed"].predictions == 5 and [m["i"] for m in results["allowed"].messages] == list(range(5))
    assert results["intruder"].predictions == 0
    assert not plain_got


def test_curve_configuration_errors_name_the_path(tmp_path, certificates):
    from xtalsym.daemon.publish import CurveError, Publisher

    ctx = zmq.Context.instance()
    with pytest.raises(CurveError, match="no such file"):
        Publisher(ctx, address="tcp://127.0.0.1:*", curve_secret_key_file=str(tmp_path / "missing.key_secret"),
                  curve_public_keys_dir=str(certificates["allowed_dir"]))
    with pytest.raises(CurveError, match="holds no secret key"):
        Publisher(ctx, address="tcp://127.0.0.1:*", curve_secret_key_file=str(certificates["server_public"]),
                  curve_public_keys_dir=str(certificates["allowed_dir"]))
    with pytest.raises(CurveError, match="curve_public_keys_dir"):
        Publisher(ctx, address="tcp://127.0.0.1:*", curve_secret_key_file=str(certificates["server_secret"]),
                  curve_public_keys_dir=str(tmp_path / "nowhere"))


def test_curve_keys_in_config_schema():
    from xtalsym.daemon.config import ConfigError, load_config

    cfg = load_config()
    assert cfg.publish.curve_secret_key_file == "" and cfg.publish.curve_public_keys_dir == ""
    with pytest.raises(ConfigError, match="curve_secret_key_file"):
        load_config(overrides={"publish": {"curve_secret_key_file": 5}})
