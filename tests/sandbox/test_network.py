"""`--net none`: a network namespace of its own, with loopback up (docker's
and podman's none), so that 127.0.0.1 works inside and nothing else does."""
from runner_rootfs import run_on as run

SERVE_AND_CONNECT = ("nc -l -p 7777 > /tmp/got & sleep 0.3; echo hello | nc -w 2 127.0.0.1 7777; "
                     "wait; cat /tmp/got; ip link show lo | grep -o 'state [A-Z]*\\|UP' | head -1")


def test_loopback_is_up_and_answers(lower, state_base):
    result = run(lower, state_base, "--net", "none", "--", "sh", "-c", SERVE_AND_CONNECT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[0] == "hello"
    assert "UP" in lines[1:]


def test_only_loopback_is_there(lower, state_base):
    result = run(lower, state_base, "--net", "none", "--", "sh", "-c",
                 "ls /sys/class/net")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["lo"]
