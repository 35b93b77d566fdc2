"""Images made through a FUSE mount program: `podman commit` of a changed
container and `podman build` with RUN steps that write, delete and recreate,
then a run of the result. podman reads the upper directory itself to make
the new layer, so the markers the mount program wrote must be ones it knows.
"""
import os

import pytest
from podman_env import IMAGE, MODES, PROGRAMS

pytestmark = [pytest.mark.parametrize("program", PROGRAMS),
              pytest.mark.parametrize("mode", MODES)]

CHANGE = """
set -e
echo committed > /committed
rm /etc/secret
rm -r /data
mkdir /data
echo z > /data/z
mkdir /data/sub
echo more >> /etc/passwd
chmod 4711 /committed
"""

CHECK = """
cat /committed
test ! -e /etc/secret && echo secret gone
echo "data: $(ls -A /data | tr '\\n' ' ')"
echo "sub: $(ls -A /data/sub | tr '\\n' ' ')"
tail -n 1 /etc/passwd
stat -c '%a %u:%g' /committed
"""

EXPECTED = ["committed", "secret gone", "data: sub z ", "sub: ", "more", "4711 0:0"]


def commit_and_run(pm):
    made = pm.run_container(CHANGE, "--name", "changed", rm=False)
    committed = pm.run("commit", "-q", "changed", "localhost/committed", check=False)
    pm.run("rm", "changed")
    ran = pm.run_container(CHECK, image="localhost/committed")
    return {"made": made.returncode, "committed": committed.returncode,
            "err": committed.returncode and committed.stderr,
            "rc": ran.returncode, "out": ran.stdout.splitlines(),
            "run_err": ran.returncode and ran.stderr}


def test_commit_then_run_the_committed_image(podman, oracle):
    got = commit_and_run(podman)
    assert got["made"] == 0 and got["committed"] == 0, got["err"]
    assert got["rc"] == 0, got["run_err"]
    assert got["out"] == EXPECTED
    assert got == oracle(commit_and_run, got)


CONTAINERFILE = f"""FROM {IMAGE}
RUN echo committed > /committed && rm /etc/secret && echo more >> /etc/passwd
RUN rm -r /data && mkdir /data && echo z > /data/z && mkdir /data/sub
RUN test ! -e /etc/secret && test -z "$(ls -A /data/sub)" && rm /data/z && echo z > /data/z
RUN chmod 4711 /committed && mkdir /etc/secret && rmdir /etc/secret
"""


def build_and_run(pm):
    context = os.path.join(pm.storage, "context")
    os.mkdir(context)
    with open(os.path.join(context, "Containerfile"), "w") as f:
        f.write(CONTAINERFILE)
    if pm.user:
        os.chown(context, pm.user.uid, pm.user.gid)
    built = pm.run("build", "-q", *pm.container_flags(), "-t", "localhost/built", context,
                   check=False)
    ran = pm.run_container(CHECK, image="localhost/built")
    return {"built": built.returncode, "err": built.returncode and built.stderr,
            "rc": ran.returncode, "out": ran.stdout.splitlines(),
            "run_err": ran.returncode and ran.stderr}


def test_build_with_run_steps_then_run(podman, oracle):
    got = build_and_run(podman)
    assert got["built"] == 0, got["err"]
    assert got["rc"] == 0, got["run_err"]
    assert got["out"] == EXPECTED
    assert got == oracle(build_and_run, got)
