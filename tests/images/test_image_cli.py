"""The image commands as a user runs them: `unionfs load|images|image
inspect|rm|prune|save|ps|rm|commit` with --store and $UNIONFS_STORE; one-line
errors with exit 1, usage errors exit 2. No mount, no external tool."""
import json
import os
import subprocess
import sys

import pytest
from imagebuild import write_oci_layout
from tarbuild import entry, make_tar

from unionfs.image import containers
from unionfs.image.store import Store

UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")
BASE = make_tar([entry("bin", "dir"), entry("bin/sh", data=b"#!", mode=0o755)])
TOP = make_tar([entry("etc", "dir"), entry("etc/motd", data=b"hi\n")])


def run(*args, store=None, env=None):
    cmd = [UNIONFS, *args] + (["--store", str(store)] if store else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def layout(tmp_path):
    path = tmp_path / "app"
    write_oci_layout(str(path), [BASE, TOP], ref_name="localhost/app:1",
                     run={"Cmd": ["/bin/sh"], "Env": ["A=1"]})
    return path


def test_load_then_images_lists_it(tmp_path, layout):
    store = tmp_path / "s"
    r = run("load", "-i", str(layout), store=store)
    assert (r.returncode, r.stdout) == (0, "Loaded image: localhost/app:1\n")
    r = run("images", store=store)
    assert r.returncode == 0
    header, row = r.stdout.splitlines()
    assert header.split()[:2] == ["REPOSITORY", "TAG"] and row.split()[:2] == ["localhost/app", "1"]


def test_store_comes_from_the_environment(tmp_path, layout):
    env = {"UNIONFS_STORE": str(tmp_path / "envstore")}
    assert run("load", "-q", "-i", str(layout), env=env).returncode == 0
    assert os.path.isdir(tmp_path / "envstore" / "layers")
    assert "localhost/app" in run("images", env=env).stdout


def test_inspect_gives_json_with_layers_top_first(tmp_path, layout):
    store = tmp_path / "s"
    run("load", "-i", str(layout), store=store)
    r = run("image", "inspect", "localhost/app:1", store=store)
    (doc,) = json.loads(r.stdout)
    assert doc["Names"] == ["localhost/app:1"] and doc["Config"]["config"]["Env"] == ["A=1"]
    assert [os.path.exists(os.path.join(layer["Dir"], "etc", "motd"))
            for layer in doc["Layers"]] == [True, False]


def test_errors_are_one_line_with_status_1(tmp_path):
    store = tmp_path / "s"
    for args in (["image", "inspect", "nosuch"], ["load", "-i", "/etc/passwd"],
                 ["load", "-i", str(tmp_path / "missing")], ["rm", "nobody"],
                 ["image", "rm", "Bad Name"], ["commit", "nobody", "localhost/x:1"],
                 ["save", "-o", str(tmp_path / "o.tar"), "nosuch"]):
        r = run(*args, store=store)
        assert r.returncode == 1, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("unionfs "), r.stderr
        assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "o.tar")


def test_usage_errors_exit_2(tmp_path):
    assert run("load", store=tmp_path / "s").returncode == 2
    assert run("save", "-o", "x.tar", "--format", "zip", "a", store=tmp_path / "s").returncode == 2
    assert run("commit", "--compression", "lz4", "c", store=tmp_path / "s").returncode == 2


def test_ps_rm_commit_and_prune(tmp_path, layout):
    store_dir = tmp_path / "s"
    run("load", "-i", str(layout), store=store_dir)
    store = Store.open(str(store_dir))
    c = containers.create(store, store.resolve("localhost/app:1"), "localhost/app:1", "web")
    with open(os.path.join(c.upper, "new"), "w") as f:
        f.write("made in the container\n")
    containers.update(store, c.id, state="exited", exit_code=0)
    assert run("ps", store=store_dir).stdout.splitlines()[1:] == []          # not running
    row = run("ps", "-a", store=store_dir).stdout.splitlines()[1]
    assert row.split()[0] == c.id[:12] and row.split()[-1] == "web" and "Exited (0)" in row
    r = run("commit", "web", "localhost/app:2", store=store_dir)
    assert r.returncode == 0 and r.stdout.startswith("sha256:")
    layers = len(os.listdir(store_dir / "layers"))
    assert layers == 3
    assert run("image", "rm", "localhost/app:1", store=store_dir).returncode == 1  # in use
    assert run("rm", "web", store=store_dir).stdout == "web\n"
    r = run("image", "rm", "localhost/app:1", store=store_dir)
    assert r.returncode == 0 and "Untagged: localhost/app:1" in r.stdout
    # app:2 still uses every layer
    assert len(os.listdir(store_dir / "layers")) == 3
    assert run("image", "rm", "localhost/app:2", store=store_dir).returncode == 0
    assert os.listdir(store_dir / "layers") == []
    r = run("image", "prune", store=store_dir)
    assert r.returncode == 0 and r.stdout.endswith("Removed 0 images, 0 layers, 0 blobs\n")


def test_save_writes_an_archive_load_reads_back(tmp_path, layout):
    store = tmp_path / "s"
    run("load", "-i", str(layout), store=store)
    for fmt in ("oci-archive", "docker-archive"):
        out = tmp_path / f"{fmt}.tar"
        assert run("save", "-o", str(out), "--format", fmt, "localhost/app:1",
                   store=store).returncode == 0
        r = run("load", "-i", str(out), store=tmp_path / f"back-{fmt}")
        assert r.stdout == "Loaded image: localhost/app:1\n", r.stderr


def test_two_loads_of_overlapping_images_at_once(tmp_path):
    """Both succeed, the shared base layer is unpacked once, nothing is left over."""
    from unionfs.image import digest as dg
    big = make_tar([entry(f"usr/f{i}", data=os.urandom(3000)) for i in range(1500)])
    for name in ("one", "two"):
        write_oci_layout(str(tmp_path / name), [big, make_tar([entry(name, data=b"x")])],
                         ref_name=f"localhost/{name}:1")
    store = tmp_path / "s"
    procs = [subprocess.Popen([UNIONFS, "load", "-q", "-i", str(tmp_path / n), "--store",
                               str(store)], stderr=subprocess.PIPE) for n in ("one", "two")]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    s = Store.open(str(store))
    layers = sorted(os.listdir(store / "layers"))
    assert len(layers) == 3 and dg.of_bytes(big)[7:] in layers
    for n in ("one", "two"):
        image = s.resolve(f"localhost/{n}:1")
        assert len(os.listdir(os.path.join(image.layers[1].lowerdir(), "usr"))) == 1500
    assert [e for e in os.listdir(store / "tmp") if e != "partial"] == []


def test_prune_waits_for_a_writer(tmp_path, layout):
    store_dir = tmp_path / "s"
    store = Store.open(str(store_dir))
    with store.writing():
        pruner = subprocess.Popen([UNIONFS, "image", "prune", "--store", str(store_dir)],
                                  stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            pruner.wait(1.0)
    assert pruner.wait(30) == 0
    assert "Removed 0 images" in pruner.stdout.read()
