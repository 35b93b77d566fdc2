"""Fixtures of the podman tier (helpers in podman_env): one storage root per
podman, a session user for rootless runs, fuse-overlayfs's results as the
oracle, and the failures fuse-unionfs is known to have, as strict xfails."""
import os
import shutil
import tempfile

import podman_env
import pytest
from podman_env import Podman, PodmanUser

# What fuse-unionfs does not do yet, per test and mode; each entry is a strict
# xfail, so a fix shows up as XPASS (a failure) and the entry must go.
KNOWN_UNIONFS_FAILURES = {
    # none left: the id options, allow_other in a user namespace and
    # xattr_permissions=2 are implemented (docs/rootless.md)
}
# What fuse-overlayfs 1.10 (Debian 12's) gets wrong, some fixed in later releases.
KNOWN_FUSE_OVERLAYFS_FAILURES = {
    "test_force_mask_shared_copy_up_keeps_the_mode_after_restart": {
        "root": "fuse-overlayfs records a copy-up's backing mode (mode | 0755) in the "
                "override xattr (copyup() in main.c, still so in 1.16): the 0600 secret "
                "shows 0755, world-readable, once copied up",
        "rootless": "fuse-overlayfs records mode | 0755 on copy-up (see root)",
    },
    "test_force_mask_shared_create_modes_and_partial_changes": {
        "root": "fuse-overlayfs < 1.14 under xattr_permissions: new files and dirs show "
                "0755 (fixed by 40b431e, f73fd2d), a chown of one id writes -1 for the "
                "other (9610adf), chmod of a lower file resets its owner to 0:0",
        "rootless": "fuse-overlayfs < 1.14: new files show 0755, chgrp loses the uid, "
                    "chmod resets the owner",
    },
}


def _interpreter_reason():
    program = podman_env.fuse_unionfs_program()
    if podman_env.others_can_run(program):
        return None
    return (f"{program} cannot be executed by a plain user (its interpreter is under a "
            "0700 directory: 'bad interpreter: Permission denied'); set "
            "UNIONFS_FUSE_UNIONFS to one outside /root")


def pytest_collection_modifyitems(config, items):
    interpreter = _interpreter_reason()
    for item in items:
        params = getattr(item, "callspec", None)
        if params is None or "program" not in params.params:
            continue
        program, mode = params.params["program"], params.params.get("mode")
        name = item.originalname
        if program == "fuse-unionfs":
            reason = KNOWN_UNIONFS_FAILURES.get(name, {}).get(mode)
            if mode == "rootless" and interpreter:
                reason = interpreter
        else:
            reason = KNOWN_FUSE_OVERLAYFS_FAILURES.get(name, {}).get(mode)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


@pytest.fixture(scope="session")
def podman_workspace():
    """World-readable: the rootless user reads the image from here."""
    path = tempfile.mkdtemp(prefix="unionfs-podman-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def rootfs_tar(podman_workspace):
    return podman_env.build_rootfs_tar(os.path.join(podman_workspace, "busybox.tar"))


@pytest.fixture(scope="session")
def test_user():
    user = PodmanUser(f"ufspm{os.getpid() % 100000}")
    try:
        yield user
    finally:
        user.remove()


@pytest.fixture
def make_podman(request, podman_workspace, rootfs_tar):
    """make_podman(program, rootless, storage_opts=()) -> a Podman on a fresh
    storage root with the busybox image loaded; all removed at teardown."""
    made = []

    def make(program, rootless, storage_opts=()):
        user = request.getfixturevalue("test_user") if rootless else None
        storage = tempfile.mkdtemp(prefix="pm-", dir=user.home if user else podman_workspace)
        pm = Podman(program, storage, user, storage_opts)
        made.append(pm)
        pm.load_image(rootfs_tar)
        return pm

    yield make
    for pm in made:
        pm.close()


@pytest.fixture
def podman(make_podman, program, mode):
    return make_podman(program, mode == "rootless")


@pytest.fixture(scope="session")
def oracle_results():
    return {}


@pytest.fixture
def oracle(make_podman, oracle_results, program, mode):
    """oracle(scenario, got, storage_opts=()): record fuse-overlayfs's result, or
    return it for comparison (running the scenario with fuse-overlayfs when
    its own test has not run in this session)."""
    def compare(scenario, got, storage_opts=()):
        key = (scenario.__name__, mode, tuple(storage_opts))
        if program == "fuse-overlayfs":
            oracle_results[key] = got
        elif key not in oracle_results:
            pm = make_podman("fuse-overlayfs", mode == "rootless", storage_opts)
            oracle_results[key] = scenario(pm)
        return oracle_results[key]
    return compare
