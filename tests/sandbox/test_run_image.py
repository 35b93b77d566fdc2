"""`unionfs run IMAGE`: a real image of the store, run in real namespaces on a real
union: its config honoured or overridden, users looked up in the container's
own files, containers kept (--name), listed, removed, committed, and images
pulled from a real registry (--pull).

Every run gets its own TMPDIR (state_base, conftest.py: nothing may be left
there) and the store is a directory of the test's own.
"""
import os
import shutil
import signal
import subprocess
import time

import pytest
from run_images import busybox_image, unionfs

from runner_rootfs import mounts_matching, processes_mentioning, wait_for_path

pytestmark = pytest.mark.timeout(180)

RUN = {"Entrypoint": None, "Cmd": ["cat", "/srv/hello"],
       "Env": ["GREETING=from the image", "PATH=/usr/bin:/bin"],
       "WorkingDir": "/srv", "User": "app"}


@pytest.fixture
def store(tmp_path, lower):     # `lower`: skips where these runner tests cannot run
    return tmp_path / "store"


@pytest.fixture
def image(store, tmp_path_factory):
    return busybox_image(store, "localhost/app:1", tmp_path_factory.getbasetemp(), RUN)


def run(store, state_base, *args, **kwargs):
    kwargs.setdefault("env", dict(os.environ, TMPDIR=state_base))
    return unionfs("run", "--store", str(store), *args, **kwargs)


def containers_of(store):
    from unionfs.image import containers
    from unionfs.image.store import Store
    return containers.list_all(Store.open(str(store)))


def test_the_image_config_is_the_default(store, image, state_base):
    result = run(store, state_base, "localhost/app:1")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello from the image\n", "")
    result = run(store, state_base, "localhost/app:1", "sh", "-c",
                 'pwd; echo "$GREETING|$PATH|$HOME"; id -u; id -g; id -G')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "/srv", "from the image|/usr/bin:/bin|/home/app", "1234", "2345", "2345 777"]


def test_options_override_the_config(store, image, state_base):
    result = run(store, state_base, "-e", "GREETING=from -e", "-e", "NEW=1", "-w", "/etc",
                 "-u", "0:0", "localhost/app:1", "sh", "-c",
                 'pwd; echo "$GREETING|$NEW|$PATH|$HOME"; id -u; id -G')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["/etc", "from -e|1|/usr/bin:/bin|/root", "0", "0"]


def test_the_default_path_only_when_the_image_has_none(store, state_base, tmp_path_factory):
    busybox_image(store, "localhost/nopath:1", tmp_path_factory.getbasetemp(),
                  {"Cmd": ["sh", "-c", "echo $PATH; echo $HOME; id -u"]})
    result = run(store, state_base, "localhost/nopath:1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "/root", "0"]


@pytest.mark.parametrize("config, args, expected", [
    ({"Entrypoint": ["echo", "ep"], "Cmd": ["cmd"]}, [], "ep cmd"),
    ({"Entrypoint": ["echo", "ep"], "Cmd": ["cmd"]}, ["IMG", "args"], "ep args"),
    ({"Entrypoint": ["echo", "ep"], "Cmd": ["cmd"]}, ["--entrypoint", "echo"], ""),
    ({"Entrypoint": ["echo", "ep"], "Cmd": ["cmd"]}, ["--entrypoint", "echo", "IMG", "x"], "x"),
    ({"Entrypoint": ["echo", "ep"], "Cmd": ["cmd"]}, ["--entrypoint", "", "IMG", "echo", "y"],
     "y"),
    ({"Cmd": ["echo", "only", "cmd"]}, [], "only cmd"),
    ({"Cmd": ["echo", "only", "cmd"]}, ["IMG", "--", "echo", "after", "dashes"],
     "after dashes"),
], ids=["entrypoint+cmd", "args-replace-cmd", "entrypoint-clears-cmd",
        "entrypoint-and-args", "empty-entrypoint", "cmd", "dashes"])
def test_entrypoint_and_cmd_as_docker_has_them(store, state_base, tmp_path_factory, config,
                                               args, expected):
    busybox_image(store, "localhost/ep:1", tmp_path_factory.getbasetemp(), config)
    if "IMG" not in args:
        args = [*args, "IMG"]
    args = ["localhost/ep:1" if a == "IMG" else a for a in args]
    result = run(store, state_base, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_an_image_without_a_command_needs_one(store, state_base, tmp_path_factory):
    busybox_image(store, "localhost/nocmd:1", tmp_path_factory.getbasetemp(), {"Env": ["A=1"]})
    result = run(store, state_base, "localhost/nocmd:1")
    assert result.returncode == 1
    assert result.stderr == ("unionfs run: the image has no command (no Entrypoint or Cmd): "
                             "give one after the image\n")
    assert containers_of(store) == []


@pytest.mark.parametrize("user, expected", [
    ("app", ["1234", "2345", "2345 777"]),             # name: primary group + memberships
    ("1234", ["1234", "2345", "2345 777"]),            # a listed uid: the same
    ("app:other", ["1234", "888", "888"]),             # a group given: only that one
    ("nobody:0", ["65534", "0", "0"]),
    ("4321", ["4321", "0", "0"]),                      # not listed: gid 0
    ("4321:4322", ["4321", "4322", "4322"]),           # numbers: nothing looked up
])
def test_users_and_groups_come_from_the_containers_files(store, image, state_base, user,
                                                         expected):
    result = run(store, state_base, "-u", user, "localhost/app:1", "sh", "-c",
                 "id -u; id -g; id -G")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


@pytest.mark.parametrize("user, message", [
    ("nosuch", "unable to find user nosuch: no matching entry in the container's /etc/passwd"),
    ("app:nosuch",
     "unable to find group nosuch: no matching entry in the container's /etc/group"),
])
def test_an_unknown_user_is_one_line_and_leaves_nothing(store, image, state_base, user,
                                                        message):
    result = run(store, state_base, "-u", user, "localhost/app:1", "true")
    assert (result.returncode, result.stderr) == (1, f"unionfs run: {message}\n")
    assert containers_of(store) == []


def test_the_containers_own_passwd_counts_not_the_hosts(store, state_base, tmp_path,
                                                         tmp_path_factory):
    # The image's /etc/passwd is an absolute symlink to a path that exists on the
    # host too. Resolved as the container resolves it, it names the image's file.
    host_file = tmp_path / "passwd-on-the-host"
    host_file.write_text("evil:x:666:666::/:/bin/sh\n")
    inside = str(host_file).lstrip("/")
    busybox_image(store, "localhost/link:1", tmp_path_factory.getbasetemp(),
                  {"Cmd": ["id", "-u"]},
                  extra={"etc/passwd": ("symlink", str(host_file)),
                         inside: b"evil:x:555:555::/:/bin/sh\n"})
    result = run(store, state_base, "-u", "evil", "localhost/link:1")
    assert (result.returncode, result.stdout) == (0, "555\n"), result.stderr
    # a relative symlink climbing out of the root stays in it
    busybox_image(store, "localhost/climb:1", tmp_path_factory.getbasetemp(),
                  {"Cmd": ["id", "-u"]},
                  extra={"etc/passwd": ("symlink", "../" * 20 + inside),
                         inside: b"evil:x:555:555::/:/bin/sh\n"})
    result = run(store, state_base, "-u", "evil", "localhost/climb:1")
    assert (result.returncode, result.stdout) == (0, "555\n"), result.stderr


def test_a_passwd_that_is_not_a_file_is_refused(store, state_base, tmp_path_factory):
    busybox_image(store, "localhost/fifo:1", tmp_path_factory.getbasetemp(), {"Cmd": ["true"]},
                  extra={"etc/passwd": ("dir", 0o755)})
    result = run(store, state_base, "-u", "app", "localhost/fifo:1")
    assert (result.returncode, result.stderr) == (
        1, "unionfs run: /etc/passwd of the container is not a regular file\n")


def test_names_on_u_work_for_a_layer_stack_too(lower, state_base):
    result = unionfs("run", "--lower", lower, "-u", "nobody", "--", "sh", "-c", "id -u; id -g",
                     env=dict(os.environ, TMPDIR=state_base))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["65534", "65534"]


# Containers: --name keeps one, ps lists it, rm removes it, commit makes an image of it.

def test_without_a_name_the_container_is_gone_afterwards(store, image, state_base):
    result = run(store, state_base, "localhost/app:1", "sh", "-c", "echo x > /tmp/x")
    assert result.returncode == 0, result.stderr
    assert containers_of(store) == []
    assert [e for e in os.listdir(store / "tmp") if e != "partial"] == []


def test_a_named_container_is_kept_listed_and_removed(store, image, state_base):
    result = run(store, state_base, "--name", "box", "-u", "root", "localhost/app:1", "sh", "-c",
                 "echo changed > /srv/hello; rm /bin/vi; exit 3")
    assert result.returncode == 3, result.stderr
    (c,) = containers_of(store)
    assert (c.name, c.state, c.exit_code, c.command) == (
        "box", "exited", 3, ["sh", "-c", "echo changed > /srv/hello; rm /bin/vi; exit 3"])
    with open(os.path.join(c.upper, "srv", "hello")) as f:
        assert f.read() == "changed\n"
    ps = unionfs("ps", "-a", "--store", str(store))
    assert ps.returncode == 0
    assert [line.split()[-3:] for line in ps.stdout.splitlines()[1:]] == [
        ["Exited", "(3)", "box"]]
    assert unionfs("ps", "--store", str(store)).stdout.splitlines()[1:] == []
    again = run(store, state_base, "--name", "box", "localhost/app:1", "true")
    assert (again.returncode, again.stderr) == (
        1, "unionfs run: cannot create the container: the container name 'box' is already in "
           "use\n")
    removed = unionfs("rm", "--store", str(store), "box")
    assert (removed.returncode, removed.stdout) == (0, "box\n")
    assert containers_of(store) == [] and not os.path.exists(c.root)


def test_a_running_container_is_up_and_rm_refuses_it(store, image, state_base, start_runner):
    runner = start_runner(["--store", str(store), "--name", "sleeper", "localhost/app:1",
                           "sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    deadline = time.monotonic() + 30
    while "Up" not in unionfs("ps", "--store", str(store)).stdout:
        assert runner.poll() is None and time.monotonic() < deadline, "never up"
        time.sleep(0.05)
    refused = unionfs("rm", "--store", str(store), "sleeper")
    assert refused.returncode == 1
    assert refused.stderr.startswith("unionfs rm: container sleeper is running (unionfs run, "
                                     f"pid {runner.pid}): ")
    assert runner.poll() is None
    forced = unionfs("rm", "-f", "--store", str(store), "sleeper")
    assert (forced.returncode, forced.stdout) == (0, "sleeper\n"), forced.stderr
    assert runner.wait(timeout=30) == 128 + signal.SIGTERM
    assert containers_of(store) == []


def test_a_killed_run_lets_go_of_its_container(store, image, state_base, start_runner):
    marker = f"killed-run-marker-{os.getpid()}"
    runner = start_runner(["--store", str(store), "--name", "killed", "localhost/app:1",
                           "sh", "-c", "sleep 60", marker],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while "Up" not in unionfs("ps", "--store", str(store)).stdout:
        assert runner.poll() is None and time.monotonic() < deadline, "never up"
        time.sleep(0.05)
    runner.kill()
    runner.wait(timeout=30)
    deadline = time.monotonic() + 30        # the container dies, the server unmounts
    while processes_mentioning(marker) or mounts_matching(state_base):
        assert time.monotonic() < deadline, "the run outlived its runner"
        time.sleep(0.05)
    assert unionfs("ps", "-a", "--store", str(store)).stdout.split()[-3:] == [
        "Exited", "(?)", "killed"]
    assert unionfs("rm", "--store", str(store), "killed").returncode == 0
    assert containers_of(store) == []
    for leftover in os.listdir(state_base):     # a killed run's state dir stays (runner.md)
        shutil.rmtree(os.path.join(state_base, leftover))


def test_commit_of_a_run_container_and_a_run_of_the_result(store, image, state_base):
    result = run(store, state_base, "--name", "work", "-u", "root", "localhost/app:1", "sh",
                 "-c", "echo new > /srv/new; rm /srv/hello; rm -r /data; mkdir /data; "
                       "echo only > /data/only; chown 1234:2345 /srv/new")
    assert result.returncode == 0, result.stderr
    committed = unionfs("commit", "--store", str(store), "work", "localhost/app:2")
    assert committed.returncode == 0, committed.stderr
    from unionfs.image.store import Store
    new = Store.open(str(store)).resolve("localhost/app:2")
    assert new.id == committed.stdout.strip()
    assert [d.digest for d in new.manifest.layers[:-1]] == \
        [d.digest for d in image.manifest.layers]       # the base layers, reused
    assert new.config.run_config == image.config.run_config
    result = run(store, state_base, "localhost/app:2", "sh", "-c",
                 "cat /srv/new; ls /srv; ls /data; stat -c %u:%g /srv/new; id -u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["new", "new", "only", "1234:2345", "1234"]


def test_dry_run_of_an_image_creates_and_pulls_nothing(store, image, state_base):
    result = run(store, state_base, "--dry-run", "--name", "dry", "localhost/app:1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"root: a union of the image localhost/app:1 ({image.id[7:19]}): "
                               f"{image.layers[0].lowerdir()}, {image.layers[1].lowerdir()} "
                               "(top first) with the upper of a new container dry, ")
    assert "user app (looked up in the container's /etc/passwd and /etc/group); cwd /srv" \
        in lines[-2]
    assert lines[-1] == "command: cat /srv/hello"
    assert containers_of(store) == []
    missing = run(store, state_base, "--dry-run", "localhost/missing:1")
    assert (missing.returncode, missing.stderr) == (
        1, "unionfs run: no image 'localhost/missing:1' in the store (--pull=never)\n")


@pytest.mark.parametrize("args, message", [
    (["--upper", "/tmp", "--work", "/tmp", "localhost/app:1"], "--upper is for a layer stack"),
    (["--keep", "localhost/app:1"], "--keep is for a layer stack"),
    (["--name", "bad name", "localhost/app:1"], "bad --name 'bad name'"),
    (["--pull", "sometimes", "localhost/app:1"], "--pull"),
    (["-u", "a b", "localhost/app:1"], "bad -u 'a b'"),
    ([], "missing IMAGE"),
])
def test_bad_image_options_are_one_line_usage_errors(store, image, state_base, args, message):
    result = run(store, state_base, *args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr
    assert containers_of(store) == []


def test_image_options_with_a_layer_stack_are_usage_errors(lower, state_base):
    result = unionfs("run", "--lower", lower, "--name", "x", "--", "true",
                     env=dict(os.environ, TMPDIR=state_base))
    assert result.returncode == 2
    assert result.stderr.startswith("unionfs run: --name is for an IMAGE, not for --lower")


def test_an_image_with_hostile_config_values_is_one_line(store, state_base, tmp_path_factory):
    busybox_image(store, "localhost/bad:1", tmp_path_factory.getbasetemp(),
                  {"Cmd": "sh -c true", "Env": ["A=1"]})
    result = run(store, state_base, "localhost/bad:1")
    assert (result.returncode, result.stderr) == (
        1, "unionfs run: the image's config has a bad Cmd (not a list of strings)\n")


def test_the_early_server_is_forked_for_an_image():
    from runner.prestart import wanted
    assert wanted(["busybox", "true"], environ={})
    assert wanted(["-e", "A=1", "-u", "app", "--name", "x", "busybox"], environ={})
    assert wanted(["--pull=always", "--tls-verify=false", "busybox"], environ={})
    assert wanted(["--", "busybox", "sh"], environ={})
    assert not wanted(["--dry-run", "busybox"], environ={})
    assert not wanted(["-q"], environ={})
    assert not wanted([], environ={})


# --pull against a real registry (docker-registry on loopback).

@pytest.fixture
def registry(tmp_path):
    if shutil.which("docker-registry") is None:
        pytest.skip("needs docker-registry (apt-get install docker-registry)")
    from registry_fixture import Proxy, Registry
    with Registry(tmp_path / "registry") as reg, Proxy(reg.host) as proxy:
        yield proxy


def test_pull_missing_always_never(tmp_path, image, store, state_base, registry):
    pushed = unionfs("push", "--store", str(store), "--tls-verify=false", "-q",
                     "localhost/app:1", f"{registry.host}/app:1")
    assert pushed.returncode == 0, pushed.stderr
    fresh = tmp_path / "fresh"
    ref = f"{registry.host}/app:1"
    never = run(fresh, state_base, "--pull=never", ref)
    assert (never.returncode, never.stderr) == (
        1, f"unionfs run: no image '{ref}' in the store (--pull=never)\n")
    registry.log.clear()
    first = run(fresh, state_base, "--tls-verify=false", ref)
    assert (first.returncode, first.stdout) == (0, "hello from the image\n"), first.stderr
    assert first.stderr.splitlines()[0] == f"unionfs run: pulling {ref}"
    assert len([e for e in registry.log if "/blobs/" in e[1]]) == 3    # config, two layers
    registry.log.clear()
    again = run(fresh, state_base, "--tls-verify=false", ref)
    assert (again.returncode, again.stdout, again.stderr) == (0, "hello from the image\n", "")
    assert registry.log == []                                          # in the store: no pull
    always = run(fresh, state_base, "--pull=always", "-q", "--tls-verify=false", ref)
    assert (always.returncode, always.stdout, always.stderr) == (
        0, "hello from the image\n", "")
    assert [e[0] for e in registry.log if "/manifests/" in e[1]] and \
        [e for e in registry.log if "/blobs/" in e[1]] == []           # asked, fetched nothing
    from unionfs.image.store import Store
    assert Store.open(str(fresh)).resolve(ref).manifest_digest == image.manifest_digest


def test_a_failed_pull_is_one_line(tmp_path, state_base, registry, lower):
    result = run(tmp_path / "fresh", state_base, "-q", "--tls-verify=false",
                 f"{registry.host}/nosuch:1")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("unionfs run: ") and "nosuch" in result.stderr


@pytest.mark.parametrize("user", ["65534:65534", "nobody"])
def test_sigkill_of_the_runner_kills_a_container_of_another_user(lower, state_base, tmp_path,
                                                                 start_runner, user):
    # PID 1 drops to the user itself; the kernel clears PR_SET_PDEATHSIG on that
    # change of credentials, so PID 1 arms it again (else it outlived the run).
    marker = f"other-user-marker-{os.getpid()}-{user.replace(':', '-')}"
    sync = tmp_path / "sync"
    sync.mkdir(mode=0o777)
    sync.chmod(0o777)
    runner = start_runner(["--lower", lower, "-u", user, "-v", f"{sync}:/sync", "--", "sh", "-c",
                           "touch /sync/ready; sleep 60", marker])
    wait_for_path(sync / "ready", runner)
    runner.kill()
    runner.wait(timeout=30)
    deadline = time.monotonic() + 30
    while processes_mentioning(marker) or mounts_matching(state_base):
        assert time.monotonic() < deadline, \
            f"outlived the runner: {processes_mentioning(marker)}"
        time.sleep(0.05)
    for leftover in os.listdir(state_base):
        shutil.rmtree(os.path.join(state_base, leftover))


def _imports_of(args, state_base):
    """The modules `unionfs run ARGS` imported (python -X importtime's report)."""
    result = unionfs("run", *args, env=dict(os.environ, TMPDIR=state_base,
                                             PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


# What start-up depends on: the image path imports no module that only applying
# layers, hashing or temporary files need, and the --lower path no image code.
SLOW_FOR_A_RUN = {"tarfile", "tempfile", "shutil", "hashlib", "unionfs.image.applier",
                  "unionfs.image.compression", "trio", "httpx"}


def test_an_image_run_imports_nothing_it_does_not_need(store, image, state_base):
    imported = _imports_of(["--store", str(store), "-u", "0:0", "localhost/app:1", "true"],
                           state_base)
    assert {"unionfs.image.store", "unionfs.image.containers"} <= imported
    assert imported & SLOW_FOR_A_RUN == set()


def test_a_layer_stack_run_imports_no_image_code(lower, state_base):
    imported = _imports_of(["--lower", lower, "--", "true"], state_base)
    assert "runner.plan" in imported
    assert {m for m in imported if m.startswith("unionfs.image")} == set()
