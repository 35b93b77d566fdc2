"""Start-up time of `unionfs run` next to its peers: the time to run /bin/true.

Two metrics, in milliseconds, interleaved (one round runs every contender
once, in turn), median of N rounds:

- premounted_time: the runner's own overhead on an already mounted stack.
  Every contender gets the same live unionfs mount as its root: chroot,
  unshare + chroot, bwrap --unshare-all, runc, `unionfs run --rootfs`, the
  same CLI started with `python -S` (no site hooks: what a non-editable
  install could do), and the runner called in-process (no interpreter start,
  no CLI).
- end_to_end_time: mount the layers, run, unmount, clean up: `unionfs run
  --lower`, `unionfs run IMAGE` (the same rootfs as a one-layer image of a
  store: the store opened, the image resolved, a container record created,
  locked and removed), the same with fuse-overlayfs as the mount program,
  and podman with fuse-overlayfs as its mount program.

`measure_startup()` returns one record per timed run:
{impl, workload: "startup", metric, value, unit: "ms", rep}. A contender whose
tool is missing is left out, one that fails stops being timed; both are named
in the optional `notes` dict. `python -m bench.startup` prints a table.

`build_busybox_rootfs(dir)` is also the tests' rootfs builder (tests/runner_rootfs.py).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import click

from runner.union import MOUNT_PROGRAM_ENV

UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")
BUSYBOX = "/bin/busybox"
PREMOUNTED, END_TO_END = "premounted_time", "end_to_end_time"
NO_SITE_MAIN = (
    "import sys; sys.path[:0] = {paths!r}; sys.argv[0] = 'unionfs'; "
    "from unionfs.cli import main; main()").format(paths=[
        sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(__file__))])
PODMAN_ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
IMAGE_NAME = "localhost/startup:latest"


def build_busybox_rootfs(root):
    """A tiny rootfs: static busybox and one symlink per applet."""
    applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    for applet in applets:
        path = os.path.join(root, applet)
        if not os.path.lexists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink("/bin/busybox", path)
    for d in ("etc", "proc", "sys", "dev", "tmp", "root"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    return root


def _spawn_and_wait(argv, env=None):
    """Run argv with no output; return (seconds, exit status)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env or os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
            (os.POSIX_SPAWN_DUP2, devnull, 2)])
        _, status = os.waitpid(pid, 0)
        return time.perf_counter() - start, os.waitstatus_to_exitcode(status)
    finally:
        os.close(devnull)


class Contender:
    def __init__(self, impl, metric, make_argv=None, call=None, env=None):
        self.impl, self.metric = impl, metric
        self.make_argv, self.call, self.env = make_argv, call, env
        self.error = None

    def time_once(self, rep):
        if self.call is not None:
            start = time.perf_counter()
            status = self.call()
            return time.perf_counter() - start, status
        argv = self.make_argv(rep)
        argv[0] = shutil.which(argv[0]) or argv[0]
        return _spawn_and_wait(argv, self.env)


class Setup:
    """The shared fixtures: a rootfs, a live union of it, a runc bundle, podman storage."""

    def __init__(self, rootfs=None):
        self.dir = tempfile.mkdtemp(prefix="unionfs-startup-")
        self.lower = rootfs or build_busybox_rootfs(os.path.join(self.dir, "lower"))
        self.mountpoint = os.path.join(self.dir, "mnt")
        self.mounted = False
        self.skipped = {}
        self.store = os.path.join(self.dir, "store")

    def mount(self):
        for d in ("mnt", "upper", "work"):
            os.mkdir(os.path.join(self.dir, d))
        upper, work = os.path.join(self.dir, "upper"), os.path.join(self.dir, "work")
        override = os.environ.get(MOUNT_PROGRAM_ENV)
        if override:  # the runner's debugging aid applies here too
            argv = [override, "-o", f"lowerdir={self.lower},upperdir={upper},workdir={work}",
                    self.mountpoint]
        else:
            argv = [UNIONFS, "mount", "--lower", self.lower, "--upper", upper, "--work", work,
                    self.mountpoint]
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)
        self.mounted = True

    def image(self, name=IMAGE_NAME):
        """The rootfs as a one-layer image (Cmd /bin/true) of the store
        self.store, put there as a load would (the layer applied from its tar)."""
        import io
        import tarfile

        from unionfs.image import formats
        from unionfs.image.store import Store
        store = Store.open(self.store)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for entry in sorted(os.listdir(self.lower)):
                tf.add(os.path.join(self.lower, entry), arcname=entry)
        info = store.apply_layer(io.BytesIO(buf.getvalue()))
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Cmd": ["/bin/true"]},
                             "rootfs": {"type": "layers", "diff_ids": [info.diff_id]}}).encode()
        manifest = formats.make_manifest(
            formats.Descriptor(formats.OCI_CONFIG, store.add_blob_bytes(config), len(config)),
            [formats.Descriptor(formats.OCI_LAYER_BY_COMPRESSION["none"], info.blob_digest,
                                info.blob_size)])
        store.add_image(manifest, [name])
        return name

    def runc_bundle(self):
        bundle = os.path.join(self.dir, "bundle")
        os.mkdir(bundle)
        subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
        path = os.path.join(bundle, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["root"] = {"path": self.mountpoint, "readonly": False}
        config["process"]["args"] = ["/bin/true"]
        config["process"]["terminal"] = False
        with open(path, "w") as f:
            json.dump(config, f)
        return bundle

    def podman(self):
        base = os.path.join(self.dir, "podman")
        command = ["podman", "--root", f"{base}/root", "--runroot", f"{base}/run",
                   "--storage-driver", "overlay",
                   "--storage-opt", "overlay.mount_program=/usr/bin/fuse-overlayfs",
                   "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                   "--runtime", "runc"]
        tar = subprocess.Popen(["tar", "-C", self.lower, "-cf", "-", "."],
                               stdout=subprocess.PIPE)
        subprocess.run([*command, "import", "-q", "-", "localhost/startup:latest"],
                       stdin=tar.stdout, check=True, capture_output=True, timeout=120)
        tar.wait()
        return command

    def close(self):
        if self.mounted:
            subprocess.run(["umount", self.mountpoint], capture_output=True)
            if os.path.ismount(self.mountpoint):
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def contenders(setup):
    """Everything this machine can run; missing tools go to setup.skipped."""
    mnt, found = setup.mountpoint, []

    def need(tool, impl):
        if shutil.which(tool) is None:
            setup.skipped[impl] = f"{tool} is not installed"
            return False
        return True

    found.append(Contender("chroot", PREMOUNTED, lambda rep: ["chroot", mnt, "/bin/true"]))
    if need("unshare", "unshare+chroot"):
        found.append(Contender("unshare+chroot", PREMOUNTED, lambda rep: [
            "unshare", "--mount", "--pid", "--uts", "--ipc", "--net", "--fork",
            "chroot", mnt, "/bin/true"]))
    if need("bwrap", "bwrap"):
        found.append(Contender("bwrap", PREMOUNTED, lambda rep: [
            "bwrap", "--unshare-all", "--bind", mnt, "/", "--proc", "/proc", "--dev", "/dev",
            "/bin/true"]))
    if need("runc", "runc"):
        bundle = setup.runc_bundle()
        state = os.path.join(setup.dir, "runc-state")
        found.append(Contender("runc", PREMOUNTED, lambda rep: [
            "runc", "--root", state, "run", "--bundle", bundle, f"startup-{os.getpid()}-{rep}"]))
    found.append(Contender("unionfs-run", PREMOUNTED, lambda rep: [
        UNIONFS, "run", "--rootfs", mnt, "--", "/bin/true"]))
    # The same CLI without `site`: what `site` still costs. (With the
    # default editable install its import hook cost 10-50 ms; scripts/setup.sh
    # installs in compat mode, a plain path entry, since then.)
    found.append(Contender("unionfs-run(python -S)", PREMOUNTED, lambda rep: [
        sys.executable, "-S", "-c", NO_SITE_MAIN, "run", "--rootfs", mnt, "--", "/bin/true"]))

    from runner.plan import build_plan
    from runner.run import execute
    plan = build_plan(["/bin/true"], rootfs=mnt)
    found.append(Contender("unionfs-run(in-process)", PREMOUNTED, call=lambda: execute(plan)))

    found.append(Contender("unionfs-run", END_TO_END, lambda rep: [
        UNIONFS, "run", "--lower", setup.lower, "--", "/bin/true"]))
    image = setup.image()
    found.append(Contender("unionfs-run(image)", END_TO_END, lambda rep: [
        UNIONFS, "run", "--store", setup.store, image]))
    found.append(Contender("unionfs-run(fuse-overlayfs)", END_TO_END, lambda rep: [
        UNIONFS, "run", "--lower", setup.lower, "--", "/bin/true"],
        env=dict(os.environ, UNIONFS_RUN_MOUNT_PROGRAM="/usr/bin/fuse-overlayfs")))
    if need("podman", "podman(fuse-overlayfs)"):
        try:
            podman = setup.podman()
            found.append(Contender("podman(fuse-overlayfs)", END_TO_END, lambda rep: [
                *podman, "run", "--rm", "--network", "none", *PODMAN_ULIMITS,
                "localhost/startup:latest", "/bin/true"]))
        except (subprocess.SubprocessError, OSError) as e:
            setup.skipped["podman(fuse-overlayfs)"] = f"podman import failed: {e}"
    return found


def measure_startup(reps=15, rootfs=None, warmup=1, notes=None):
    """Time every contender `reps` times, interleaved; return the list of records.

    `notes`, if given, is a dict that receives {impl: reason} for contenders
    that were skipped (tool missing) or failed (non-zero exit).
    """
    notes = {} if notes is None else notes
    setup = Setup(rootfs)
    records = []
    try:
        setup.mount()
        field = contenders(setup)
        notes.update((impl, f"skipped: {why}") for impl, why in setup.skipped.items())
        for rep in range(-warmup, reps):
            for contender in field:
                if contender.error:
                    continue
                seconds, status = contender.time_once(rep)
                if status != 0:
                    contender.error = f"failed: exit status {status}"
                    notes[f"{contender.impl} ({contender.metric})"] = contender.error
                    continue
                if rep >= 0:
                    records.append({"impl": contender.impl, "workload": "startup",
                                    "metric": contender.metric, "value": seconds * 1000,
                                    "unit": "ms", "rep": rep})
        return records
    finally:
        setup.close()


def medians(records):
    """{(impl, metric): median value}, in first-seen order."""
    groups = {}
    for record in records:
        groups.setdefault((record["impl"], record["metric"]), []).append(record["value"])
    return {key: statistics.median(values) for key, values in groups.items()}


def format_table(records):
    table = medians(records)
    counts = {}
    for record in records:
        key = (record["impl"], record["metric"])
        counts[key] = counts.get(key, 0) + 1
    reference = {PREMOUNTED: table.get(("bwrap", PREMOUNTED)),
                 END_TO_END: table.get(("podman(fuse-overlayfs)", END_TO_END))}
    ref_name = {PREMOUNTED: "bwrap", END_TO_END: "podman"}
    lines = [f"{'metric':<16} {'impl':<28} {'median ms':>10} {'n':>4}  ratio"]
    for metric in (PREMOUNTED, END_TO_END):
        for (impl, m), value in table.items():
            if m != metric:
                continue
            ref = reference[metric]
            ratio = f"{value / ref:.2f}x {ref_name[metric]}" if ref else ""
            lines.append(f"{metric:<16} {impl:<28} {value:>10.1f} {counts[(impl, m)]:>4}  {ratio}")
    return "\n".join(lines)


def stale_bytecode(packages=("unionfs", "runner")):
    """The project's modules whose bytecode cache is missing or out of date.

    With PYTHONDONTWRITEBYTECODE set, each of them is compiled again by every
    process that imports it, which the timings then include.
    """
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stale = []
    for package in packages:
        for parent, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                source = os.path.join(parent, name)
                if not _fresh_bytecode(source, importlib.util.cache_from_source(source)):
                    stale.append(os.path.relpath(source, root))
    return stale


def _fresh_bytecode(source, cache):
    try:
        with open(cache, "rb") as f:
            header = f.read(16)
        st = os.stat(source)
    except OSError:
        return False
    return (int.from_bytes(header[4:8], "little") == 0
            and int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF)


@click.command()
@click.option("--reps", default=15, show_default=True, help="Timed rounds (median reported).")
@click.option("--rootfs", type=click.Path(exists=True, file_okay=False),
              help="Root to use (default: a busybox-static rootfs built on the fly).")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines too.")
def main(reps, rootfs, as_json):
    """Time `/bin/true` under unionfs run and its peers; print a table."""
    stale = stale_bytecode()
    if stale and sys.dont_write_bytecode:
        click.echo(f"note: PYTHONDONTWRITEBYTECODE is set and {len(stale)} modules have no "
                   f"up-to-date bytecode ({', '.join(stale)}): every run compiles them "
                   "(`python -m compileall unionfs runner` refreshes the caches)")
    notes = {}
    records = measure_startup(reps, rootfs and os.path.abspath(rootfs), notes=notes)
    click.echo(format_table(records))
    for impl, note in notes.items():
        click.echo(f"{impl}: {note}")
    if as_json:
        for record in records:
            click.echo(json.dumps(record))


if __name__ == "__main__":
    main()
