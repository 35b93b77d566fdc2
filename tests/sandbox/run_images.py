"""Test helper: real images for `unionfs run IMAGE`, built offline into a store.

`busybox_image(store_dir, name, run=..., extra=...)` stores an image of two
layers: the tests' busybox rootfs (runner_rootfs.build_rootfs, plus users and
groups) as the base, and a small top layer (`extra`: {path: bytes or a
("symlink", target) tuple}); `run` is its config (Entrypoint, Cmd, Env, ...).
The layers are tars of real directories (tarfile, numeric owners); the image
goes into the store through the same calls a load makes (tests/images/
imagebuild.py). Nothing here mocks anything.
"""
import io
import os
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "images"))

from imagebuild import store_image  # noqa: E402

from runner_rootfs import UNIONFS, build_rootfs  # noqa: E402

PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "nobody:x:65534:65534::/:/bin/sh\n"
          "app:x:1234:2345:app user:/home/app:/bin/sh\n")
GROUP = "root:x:0:\nnogroup:x:65534:\napp:x:2345:\nextra:x:777:nobody,app\nother:x:888:\n"


def tar_of_dir(root):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(os.listdir(root)):
            tf.add(os.path.join(root, name), arcname=name)
    return buf.getvalue()


def tar_of(files):
    """A layer from {path: bytes | ("symlink", target) | ("dir", mode)}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        made = set()
        for path, what in sorted(files.items()):
            parts = path.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made:
                    made.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    tf.addfile(ti)
            ti = tarfile.TarInfo(path)
            if isinstance(what, tuple) and what[0] == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, what[1]
                tf.addfile(ti)
            elif isinstance(what, tuple) and what[0] == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, what[1]
                made.add(path)
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(what), 0o644
                tf.addfile(ti, io.BytesIO(what))
    return buf.getvalue()


_BASE = {}


def base_layer(tmp_root):
    """The busybox rootfs with users, groups and a home, as a tar (built once)."""
    if "tar" not in _BASE:
        root = build_rootfs(os.path.join(tmp_root, "image-base"))
        with open(os.path.join(root, "etc", "passwd"), "w") as f:
            f.write(PASSWD)
        with open(os.path.join(root, "etc", "group"), "w") as f:
            f.write(GROUP)
        os.makedirs(os.path.join(root, "home", "app"))
        os.chown(os.path.join(root, "home", "app"), 1234, 2345)
        _BASE["tar"] = tar_of_dir(root)
    return _BASE["tar"]


def busybox_image(store_dir, name, tmp_root, run=None, extra=None):
    """Store a two-layer image named `name`; returns the store's Image."""
    from unionfs.image.store import Store
    store = Store.open(str(store_dir))
    top = tar_of(extra or {"srv/hello": b"hello from the image\n"})
    digest = store_image(store, [base_layer(str(tmp_root)), top], [name],
                         run=run if run is not None else {"Cmd": ["cat", "/srv/hello"]})
    return store.resolve(digest)


def unionfs(*args, **kwargs):
    """`unionfs ARGS` (any subcommand), output captured as text."""
    import subprocess
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 120)
    return subprocess.run([UNIONFS, *args], **kwargs)
