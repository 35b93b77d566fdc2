"""The daemon with real mounts: mounts through pre-started servers, surviving
and re-adopted across daemon restarts, in the caller's mount namespace,
seen and controlled only by their owner, counted and explained."""
import concurrent.futures
import json
import os
import signal
import subprocess

import pytest
from daemonutil import UNIONFS, wait_listed

from mountutil import force_unmount, wait_for


@pytest.fixture
def layers(make_stack):
    s = make_stack()
    (s.lowers[1] / "f").write_text("lower f\n")
    (s.lowers[1] / "gone").write_text("x")
    (s.lowers[1] / "d").mkdir()
    (s.lowers[1] / "d" / "inside").write_text("i")
    (s.lowers[0] / "d").mkdir()
    (s.lowers[0] / "top").write_text("top\n")
    return s


def mount(daemon, s, **kw):
    res = daemon.mount(s.lowers, s.upper, s.work, s.mnt, **kw)
    assert res.returncode == 0, res.stderr
    return res


def test_a_mount_through_the_daemon_is_served_by_a_pooled_server(daemon, layers):
    # the pool fills after the socket is up: take the snapshot once it is full
    wait_for(lambda: len(daemon.pooled_pids()) >= daemon.pool, what="the pool")
    pooled = daemon.pooled_pids()
    mount(daemon, layers)
    assert (layers.mnt / "f").read_text() == "lower f\n"
    (layers.mnt / "f").write_text("changed\n")
    assert (layers.upper / "f").read_text() == "changed\n"
    [m] = daemon.mounts()
    assert m["mountpoint"] == str(layers.mnt)
    assert m["layers"]["lowers"] == [str(p) for p in layers.lowers]
    assert m["pid"] in pooled          # one that was started ahead, not for this mount
    wait_for(lambda: len(daemon.pooled_pids() - {m["pid"]}) >= 2, what="pool refilled")


def test_unmount_by_the_kernel_removes_the_record_and_ends_the_server(daemon, layers):
    mount(daemon, layers)
    [m] = daemon.mounts()
    subprocess.run(["umount", str(layers.mnt)], check=True)
    wait_listed(daemon, 0)
    wait_for(lambda: not os.path.exists(f"/proc/{m['pid']}"), what="server exit")


def test_unmount_through_the_api(daemon, layers):
    mount(daemon, layers)
    [m] = daemon.mounts()
    status, answer = daemon.api("DELETE", f"/v1/mounts/{m['id']}")
    assert status == 200 and answer["server_exited"], answer
    assert not os.path.ismount(layers.mnt)


def test_mounts_survive_the_daemon_and_are_adopted_by_the_next(make_daemon, layers):
    first = make_daemon()
    mount(first, layers)
    [m] = first.mounts()
    first.stop()
    assert (layers.mnt / "f").read_text() == "lower f\n"      # still served
    second = make_daemon()
    [adopted] = second.mounts()
    assert (adopted["id"], adopted["pid"], adopted["adopted"]) == (m["id"], m["pid"], True)
    status, stats = second.api("GET", f"/v1/mounts/{m['id']}/stats")
    assert status == 200 and stats["pid"] == m["pid"]
    subprocess.run(["umount", str(layers.mnt)], check=True)
    wait_listed(second, 0)


def test_the_mount_lands_in_the_callers_mount_namespace(daemon, layers):
    script = (f"{UNIONFS} mount --lower {layers.lowers[0]} --lower {layers.lowers[1]} "
              f"--upper {layers.upper} --work {layers.work} {layers.mnt} && "
              f"cat {layers.mnt}/top && findmnt -n -o FSTYPE {layers.mnt} && "
              f"umount {layers.mnt}")
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, env=daemon.env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["top", "fuse.unionfs"]
    assert not os.path.ismount(layers.mnt)          # never in the daemon's namespace


def test_stats_count_what_was_done(daemon, layers):
    for i in range(5):
        (layers.lowers[1] / f"c{i}").write_text("x")
    mount(daemon, layers)
    [m] = daemon.mounts()

    def stats():
        return daemon.api("GET", f"/v1/mounts/{m['id']}/stats")[1]
    before = stats()
    # five names never looked up: 5 LOOKUPs; the O_PATH fds pin them, so a
    # cache drop elsewhere on the machine (other tests) neither FORGETs the
    # nodes nor makes the kernel look them up again
    pinned = [os.open(layers.mnt / f"c{i}", os.O_PATH | os.O_NOFOLLOW) for i in range(5)]
    try:
        for i in range(3):
            with open(layers.mnt / f"c{i}", "a") as f:  # three copy-ups
                f.write("y")
        after = stats()
    finally:
        for fd in pinned:
            os.close(fd)
    lookups = after["requests"]["lookup"]["count"] - \
        before["requests"].get("lookup", {"count": 0})["count"]
    assert lookups == 5
    assert after["copyups"]["full"]["count"] - \
        before["copyups"].get("full", {"count": 0})["count"] == 3
    assert after["copyups"]["full"]["bytes"] >= 3
    assert {"p50_us", "p90_us", "p99_us"} <= set(after["requests"]["lookup"])
    assert after["memory"]["vmrss_kib"] > 0 and after["nodes"] >= 5


def which(path, fmt="json"):
    res = subprocess.run([UNIONFS, "which", "--format", fmt, str(path)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout) if fmt == "json" else res.stdout


def test_which_explains_every_kind_of_entry(daemon, layers):
    (layers.lowers[1] / "o").mkdir()
    (layers.lowers[1] / "o" / "old").write_text("o")
    mount(daemon, layers)
    m = layers.mnt
    (m / "made").write_text("new")
    with open(m / "f", "a") as f:
        f.write("+")
    os.unlink(m / "gone")
    os.unlink(m / "o" / "old")
    os.rmdir(m / "o")
    os.mkdir(m / "o")                               # opaque now
    assert which(m / "top")["layer"] == "lower 1"
    assert which(m / "d" / "inside")["layer"] == "lower 2"
    assert which(m / "made")["copied_up"] is False
    assert which(m / "f")["copied_up"] is True and which(m / "f")["layer"] == "upper"
    assert which(m / "gone")["whited_out"]["layer"] == "upper"
    assert which(m / "nothing") == {"path": "/nothing", "exists": False}
    assert which(m / "d")["merged"] == ["lower 1", "lower 2"]
    assert which(m / "o")["opaque"] == "upper"
    assert which(m / "d")["layer_dir"] == str(layers.lowers[0])
    text = which(m / "gone", "text")
    assert "whited out in upper" in text


def test_a_pooled_server_killed_before_it_is_claimed_is_replaced(daemon, layers):
    victim = sorted(daemon.pooled_pids())[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(daemon.pooled_pids()) >= 2 and victim not in daemon.pooled_pids(),
             what="a replacement")
    mount(daemon, layers)
    assert daemon.mounts()[0]["pid"] != victim


def test_twenty_mounts_at_once_with_a_pool_of_two(make_daemon, make_stack):
    d = make_daemon(pool=2)
    stacks = [make_stack(1, tag=f"s{i}-") for i in range(20)]
    for i, s in enumerate(stacks):
        (s.lowers[0] / "id").write_text(str(i))
    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        results = list(ex.map(lambda s: d.mount(s.lowers, s.upper, s.work, s.mnt), stacks))
    try:
        assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results]
        assert [(s.mnt / "id").read_text() for s in stacks] == [str(i) for i in range(20)]
        mounts = d.mounts()
        assert len({m["pid"] for m in mounts}) == 20
        status, info = d.api("GET", "/v1/info")
        assert info["mounts"] == 20
    finally:
        for s in stacks:
            force_unmount(s.mnt)


def test_the_event_stream_reports_mounts_copy_ups_and_unmounts(daemon, layers):
    events = subprocess.Popen(["curl", "-sN", "--unix-socket", daemon.socket,
                               "http://unionfs/v1/events"], stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(events.stdout.readline()) == {"type": "subscribed"}
        mount(daemon, layers)
        with open(layers.mnt / "f", "a") as f:
            f.write("+")
        subprocess.run(["umount", str(layers.mnt)], check=True)
        seen = []
        while not seen or seen[-1]["type"] != "unmount":
            seen.append(json.loads(events.stdout.readline()))
    finally:
        events.kill()
        events.wait()
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "mount" and kinds[-1] == "unmount" and "copy-up" in kinds
    copy = next(e for e in seen if e["type"] == "copy-up")
    assert copy["path"] == "/f" and copy["kind"] == "full"


def test_without_a_daemon_stats_and_which_ask_the_server_and_events_says_so(layers, tmp_path):
    env = {**os.environ, "UNIONFS_SOCKET": str(tmp_path / "none.sock")}
    with layers.unionfs():
        res = subprocess.run([UNIONFS, "stats", "--no-stream", "--format", "json",
                              str(layers.mnt)], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)[str(layers.mnt)]["pid"] > 0
        assert which(layers.mnt / "top")["layer"] == "lower 1"
    res = subprocess.run([UNIONFS, "events"], capture_output=True, text=True, env=env,
                         timeout=10)
    assert res.returncode == 1 and "no unionfs daemon" in res.stderr
