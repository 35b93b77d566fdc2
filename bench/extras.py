"""Benchmarks beside the filesystem suite, run by `unionfs bench --extras NAME,...`:

- startup: `unionfs run` against chroot, bwrap, runc and podman (bench.startup)
- podman:  `podman run --rm IMG true`, root and rootless, fuse-unionfs against
           fuse-overlayfs, and the mount program alone (bench.podman)
- images:  pull, push again, load and commit against skopeo, umoci and podman
           (bench.images)
- daemon:  mounts through the daemon, its API round trip and memory, podman
           through it (bench.daemon)

Each writes its records (records-extras.jsonl) and a table in summary.md
(section "Extras"); all interleave their contenders within themselves.
"""
import json
import os
import tempfile

NAMES = ("startup", "podman", "images", "daemon")


def _startup(reps, log):
    from . import startup
    notes = {}
    return startup.measure_startup(reps, notes=notes), startup.format_table, notes


def _podman(reps, log):
    from . import podman
    notes = {}
    with tempfile.TemporaryDirectory(prefix="ufb-", dir="/tmp") as work:
        os.chmod(work, 0o755)      # rootless podman reads the image tar from here
        modes = ["root"] + (["rootless"] if podman.others_can_run(podman.fuse_unionfs_program())
                            else [])
        records = podman.measure_podman_run(reps, modes, work, notes)
        records += podman.measure_mount(reps, work)
    return records, podman.format_table, notes


def _images(reps, log):
    from . import images
    notes = {}
    return images.measure_images(max(1, reps // 3), notes=notes, log=log), \
        images.format_table, notes


def _daemon(reps, log):
    from . import daemon
    records = (daemon.measure_daemon(reps) + daemon.measure_podman(reps)
               + daemon.measure_run(reps))
    return records, daemon.format_table, {}


RUNNERS = {"startup": _startup, "podman": _podman, "images": _images, "daemon": _daemon}


def run(names, reps, out_dir, log=print):
    """Run the named extras; returns the markdown section for the summary."""
    sections = ["## Extras", ""]
    path = os.path.join(out_dir, "records-extras.jsonl")
    for name in names:
        log(f"extras: {name}")
        try:
            records, fmt, notes = RUNNERS[name](reps, log)
        except Exception as e:  # noqa: BLE001 - one extra failing must not lose the others
            sections += [f"### {name}", "", f"failed: {type(e).__name__}: {e}", ""]
            continue
        with open(path, "a") as f:
            for record in records:
                f.write(json.dumps({"extra": name, **record}) + "\n")
        sections += [f"### {name}", "", "```", fmt(records), "```", ""]
        sections += [f"- {impl}: {note}" for impl, note in notes.items()]
        sections.append("")
    return "\n".join(sections)
