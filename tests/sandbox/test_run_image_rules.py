"""The pure rules of `unionfs run IMAGE`, without a mount: the image config with
the command line's overrides (runner.image.settings), `--pull` (find_image on a
real store), and users and groups (runner.users) read from a directory the way
the runner reads the mounted root."""
import os

import pytest
from run_images import tar_of

from runner.image import ImageError, find_image, settings
from runner.plan import PlanError, build_plan, parse_env
from runner.users import UserError, parse_spec, read_in_root, resolve

CONFIG = {"Entrypoint": ["/ep", "-x"], "Cmd": ["a", "b"], "Env": ["A=1", "PATH=/only"],
          "WorkingDir": "/srv", "User": "app"}


@pytest.mark.parametrize("entrypoint, args, argv", [
    (None, (), ["/ep", "-x", "a", "b"]),
    (None, ("c",), ["/ep", "-x", "c"]),                 # CMD args replace Cmd
    ("/other", (), ["/other"]),                         # --entrypoint clears Cmd
    ("/other", ("c", "d"), ["/other", "c", "d"]),
    ("", ("sh",), ["sh"]),                              # --entrypoint '' clears both
])
def test_entrypoint_and_cmd(entrypoint, args, argv):
    assert settings(CONFIG, entrypoint, args)[0] == argv


def test_config_defaults_and_overrides():
    assert settings(CONFIG) == (["/ep", "-x", "a", "b"], ["A=1", "PATH=/only"], "/srv", "app")
    assert settings(CONFIG, workdir="/w", user="0")[2:] == ("/w", "0")
    assert settings({"Cmd": ["x"], "WorkingDir": "rel/dir"})[2] == "/rel/dir"
    assert settings({"Cmd": ["x"], "WorkingDir": "", "User": ""})[2:] == ("/", None)


@pytest.mark.parametrize("config, message", [
    ({}, "no command"),
    ({"Entrypoint": None, "Cmd": None}, "no command"),
    ({"Cmd": "sh -c x"}, "bad Cmd"),
    ({"Cmd": ["x", 1]}, "bad Cmd"),
    ({"Cmd": ["x"], "Env": "A=1"}, "bad Env"),
    ({"Cmd": ["x"], "WorkingDir": ["/"]}, "bad WorkingDir"),
    ({"Cmd": ["x"], "User": 0}, "bad User"),
])
def test_a_config_that_cannot_run_is_one_line(config, message):
    with pytest.raises(ImageError, match=message):
        settings(config)


def test_env_the_image_then_e_and_path_only_when_missing():
    env = dict(parse_env(["A=2", "B=3"], host_env={"TERM": "xterm"}, base=["A=1", "PATH=/p",
                                                                             "bare", "=x"]))
    assert env == {"A": "2", "B": "3", "PATH": "/p", "TERM": "xterm"}
    assert dict(parse_env([], host_env={}, base=["A=1"]))["PATH"].startswith("/usr/local/sbin")
    assert "HOME" not in dict(parse_env([], host_env={}, base=[]))     # the user's, later


def test_home_is_roots_or_slash_without_a_lookup(tmp_path):
    plan = build_plan(["x"], lowers=[str(tmp_path)], base_env=["A=1"], user="0:0", host_env={})
    assert dict(plan.env)["HOME"] == "/root" and plan.user is None
    plan = build_plan(["x"], lowers=[str(tmp_path)], base_env=[], user="7:7", host_env={})
    assert dict(plan.env)["HOME"] == "/"
    plan = build_plan(["x"], lowers=[str(tmp_path)], base_env=[], user="app", host_env={})
    assert "HOME" not in dict(plan.env) and plan.user == ("app", None)
    with pytest.raises(PlanError, match="NUL"):
        build_plan(["a\0b"], lowers=[str(tmp_path)])


# -- users ---------------------------------------------------------------------

PASSWD = """root:x:0:0:root:/root:/bin/sh
# a comment
broken line
app:x:1234:2345:App:/home/app:/bin/sh
nohome:x:50:51:::/bin/sh
+nis:::::
"""
GROUP = "root:x:0:\napp:x:2345:\nextra:x:777:nobody,app\nmore:x:778:app\nbad:x:z:app\n"


@pytest.mark.parametrize("spec, parsed", [
    ("app", ("app", None)), ("1234", (1234, None)), ("app:extra", ("app", "extra")),
    ("0:0", (0, 0)), ("_x.y-z$", ("_x.y-z$", None)),
])
def test_parse_spec(spec, parsed):
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["", ":", "1:", ":1", "-1", "a b", "a/b", "4294967295", "a:b:c",
                                  "x" * 300])
def test_parse_spec_refuses(spec):
    with pytest.raises(ValueError, match="bad -u"):
        parse_spec(spec)


@pytest.mark.parametrize("user, group, expected", [
    ("app", None, (1234, 2345, (2345, 777, 778), "/home/app")),
    (1234, None, (1234, 2345, (2345, 777, 778), "/home/app")),
    ("app", "extra", (1234, 777, (), "/home/app")),
    ("app", 9, (1234, 9, (), "/home/app")),
    (4321, None, (4321, 0, (), None)),
    ("nohome", None, (50, 51, (51,), None)),
    ("root", None, (0, 0, (0,), "/root")),
])
def test_resolve(user, group, expected):
    assert resolve(user, group, PASSWD, GROUP) == expected


@pytest.mark.parametrize("user, group, passwd, group_text, message", [
    ("nosuch", None, PASSWD, GROUP, "unable to find user nosuch: no matching entry"),
    ("+nis", None, PASSWD, GROUP, "unable to find user \\+nis"),
    ("app", "nosuch", PASSWD, GROUP, "unable to find group nosuch"),
    ("app", None, None, None, "the container has no /etc/passwd"),
    (0, "extra", PASSWD, None, "the container has no /etc/group"),
])
def test_resolve_refuses(user, group, passwd, group_text, message):
    with pytest.raises(UserError, match=message):
        resolve(user, group, passwd, group_text)


@pytest.fixture
def root(tmp_path):
    """A container root with /etc/passwd, and a host file beside it."""
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "passwd").write_text("app:x:1:1::/:/bin/sh\n")
    (tmp_path / "host-secret").write_text("host:x:0:0::/:/bin/sh\n")
    return r


def test_read_in_root_reads_the_file(root):
    assert read_in_root(str(root), "/etc/passwd") == "app:x:1:1::/:/bin/sh\n"
    assert read_in_root(str(root), "/etc/group") is None


@pytest.mark.parametrize("target", ["../../host-secret", "/../host-secret"])
def test_a_symlink_out_of_the_root_resolves_inside_it(root, target):
    (root / "etc" / "group").symlink_to(target)
    assert read_in_root(str(root), "/etc/group") is None        # not the host's file
    (root / "host-secret").write_text("inside\n")
    assert read_in_root(str(root), "/etc/group") == "inside\n"  # the root's own


def test_an_absolute_symlink_resolves_inside_the_root(root, tmp_path):
    (root / "etc" / "group").symlink_to(str(tmp_path / "host-secret"))
    assert read_in_root(str(root), "/etc/group") is None
    os.makedirs(str(root) + str(tmp_path))
    with open(str(root) + str(tmp_path / "host-secret"), "w") as f:
        f.write("inside\n")
    assert read_in_root(str(root), "/etc/group") == "inside\n"


def test_only_a_regular_file_is_read(root):
    os.mkfifo(root / "etc" / "group")           # reading it would block
    with pytest.raises(UserError, match="not a regular file"):
        read_in_root(str(root), "/etc/group")
    os.mknod(root / "etc" / "shadow", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero
    with pytest.raises(UserError, match="not a regular file"):
        read_in_root(str(root), "/etc/shadow")


def test_a_huge_file_is_read_only_in_part(root):
    from runner.users import MAX_FILE
    with open(root / "etc" / "group", "wb") as f:
        f.truncate(MAX_FILE * 4)
    assert len(read_in_root(str(root), "/etc/group")) == MAX_FILE


def test_a_symlink_loop_is_as_good_as_absent(root):
    (root / "etc" / "group").symlink_to("group")
    assert read_in_root(str(root), "/etc/group") is None


# -- --pull on a real store ------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    from imagebuild import store_image

    from unionfs.image.store import Store
    s = Store.open(str(tmp_path / "store"))
    store_image(s, [tar_of({"x": b"x"})], ["localhost/here:1"], run={"Cmd": ["x"]})
    return s


def test_find_image_pulls_as_the_policy_says(store):
    pulled = []

    def pull(ref):
        pulled.append(ref)
        return store.resolve("localhost/here:1")
    assert find_image(store, "localhost/here:1", "missing", pull).names == ("localhost/here:1",)
    assert pulled == []
    find_image(store, "localhost/other:1", "missing", pull)
    find_image(store, "localhost/here:1", "always", pull)
    assert pulled == ["localhost/other:1", "localhost/here:1"]
    with pytest.raises(ImageError, match=r"no image 'localhost/other:1' .*\(--pull=never\)"):
        find_image(store, "localhost/other:1", "never", pull)
    image_id = store.resolve("localhost/here:1").id
    assert find_image(store, image_id, "never", pull).id == image_id
    with pytest.raises(ImageError, match="no image 'sha256:0000"):
        find_image(store, "sha256:" + "0" * 64, "missing", pull)   # an id is never pulled
    with pytest.raises(ImageError, match="cannot be pulled"):
        find_image(store, "0" * 64, "always", pull)
    assert len(pulled) == 2


def test_a_dotdot_that_races_with_renames_is_tried_again(root):
    # openat2(RESOLVE_IN_ROOT) answers EAGAIN for a `..` resolved while any rename
    # happens on the system; a busy machine made runs fail with "Resource
    # temporarily unavailable". Renames in a loop beside a `..` link provoke it.
    import threading
    (root / "etc" / "group").symlink_to("../etc/../etc/passwd")
    stop = threading.Event()

    def rename_forever():
        a, b = root / "ra", root / "rb"
        a.mkdir()
        while not stop.is_set():
            os.rename(a, b)
            os.rename(b, a)
    renamer = threading.Thread(target=rename_forever)
    renamer.start()
    try:
        for _ in range(3000):
            assert read_in_root(str(root), "/etc/group") == "app:x:1:1::/:/bin/sh\n"
    finally:
        stop.set()
        renamer.join()
