"""`unionfs bench`: build (or reuse) the stack, run the suite, write the report."""
import dataclasses
import datetime
import json
import os
import subprocess
import time

import click

from . import debian as debianmod
from . import extras as extrasmod
from . import report
from . import scale as scalemod
from . import stack as stackmod
from . import suite as suitemod
from .targets import all_targets
from .workloads import GROUPS, build_workloads

CONFIGS = ("ext4", "xfs-reflink", "scale", "debian")
# --quick never builds the Debian rootfs unless asked for (--configs debian)
QUICK_CONFIGS = ("ext4", "xfs-reflink", "scale")
# On the XFS image only copy-up is measured: that is where reflink changes the cost.
XFS_GROUPS = ("copyup", "metadata-copyup")


def _split(values):
    return [v for value in values for v in value.split(",") if v]


@click.command()
@click.option("--quick", is_flag=True, help="A small stack and one repetition (about a minute).")
@click.option("--out", "out_dir", default="bench-out", show_default=True,
              type=click.Path(file_okay=False), help="Directory for records, summary, charts.")
@click.option("--targets", "target_names", multiple=True, metavar="NAME[,NAME]",
              help="Only these implementations (default: all).")
@click.option("--workloads", "workload_names", multiple=True, metavar="NAME[,NAME]",
              help="Only these workloads or workload groups (default: all).")
@click.option("--configs", "config_names", multiple=True, metavar="NAME[,NAME]",
              help="ext4 (the host filesystem), xfs-reflink, scale, debian (default: all; "
                   "--quick: all but debian); none: only the --extras.")
@click.option("--extras", "extra_names", multiple=True, metavar="NAME[,NAME]",
              help="Also run these benchmarks: startup, podman, images, daemon (bench.extras).")
@click.option("--reps", type=click.IntRange(1), help="Repetitions (default 5; --quick 1).")
@click.option("--heavy-reps", type=click.IntRange(1),
              help="Repetitions of the 1 GiB workloads (default 5; --quick 1).")
@click.option("--timeout", default=None, type=click.IntRange(1),
              help="Seconds before one workload run counts as hung (default 600; --quick 60).")
@click.option("--list", "list_only", is_flag=True,
              help="List the targets (and why one cannot run) and the workloads, then exit.")
def bench(quick, out_dir, target_names, workload_names, config_names, reps, heavy_reps, timeout,
          list_only, extra_names):
    """Time unionfs against native, kernel overlayfs, fuse-overlayfs and unionfs-fuse."""
    params = stackmod.QUICK if quick else stackmod.FULL
    targets = all_targets()
    if list_only:
        for t in targets:
            reason = t.unavailable()
            click.echo(f"target   {t.name:20} {'unavailable: ' + reason if reason else ''}")
        for w in build_workloads({"params": dataclasses.asdict(params)}):
            click.echo(f"workload {w.name:28} group {w.group}")
        for w in scalemod.build_workloads() + debianmod.build_workloads():
            click.echo(f"workload {w.name:28} group {w.group} (config {w.group})")
        for name in CONFIGS:
            click.echo(f"config   {name}")
        return
    known = [t.name for t in targets]
    wanted = _split(target_names)
    for name in wanted:
        if name not in known:
            raise click.UsageError(f"unknown target {name!r}; known: {', '.join(known)}")
    if wanted:
        targets = [t for t in targets if t.name in wanted]
    extras = _split(extra_names)
    for name in extras:
        if name not in extrasmod.NAMES:
            raise click.UsageError(f"unknown extra {name!r}; known: {', '.join(extrasmod.NAMES)}")
    configs = _split(config_names) or list(QUICK_CONFIGS if quick else CONFIGS)
    if configs == ["none"]:
        configs = []
    for name in configs:
        if name not in CONFIGS:
            raise click.UsageError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    wanted_workloads = _split(workload_names)
    if os.geteuid() != 0:
        raise click.ClickException("unionfs bench needs root (it mounts filesystems)")

    log = suitemod.default_log
    os.makedirs(out_dir, exist_ok=True)
    records_path = os.path.join(out_dir, "records.jsonl")
    if os.path.exists(records_path):
        os.unlink(records_path)
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    base = None
    if {"ext4", "xfs-reflink"} & set(configs):   # the scale config has a stack of its own
        try:
            base = stackmod.build(params, log=log)
        except OSError as e:
            raise click.ClickException(f"cannot build the stack: {e}") from None
    all_workloads = build_workloads(base.meta if base else {"params": dataclasses.asdict(params)})
    scale_workloads = scalemod.build_workloads()
    debian_workloads = debianmod.build_workloads()
    known_workloads = ({w.name for w in all_workloads + scale_workloads + debian_workloads}
                       | set(GROUPS) | {"scale", "debian"})
    for name in wanted_workloads:
        if name not in known_workloads:
            raise click.UsageError(f"unknown workload {name!r}; known: "
                                   f"{', '.join(sorted(known_workloads))}")

    def select(groups=None, workloads=all_workloads):
        chosen = [w for w in workloads
                  if not wanted_workloads or w.name in wanted_workloads
                  or w.group in wanted_workloads]
        return [w for w in chosen if groups is None or w.group in groups]

    config_objs, cleanups, skipped_configs = [], [], []
    try:
        for name in configs:
            if name == "ext4":
                config_objs.append(suitemod.Config(
                    "ext4", base, suitemod.fstype_of(base.root), select()))
            elif name == "scale":
                chosen = select(workloads=scale_workloads)
                if not chosen:
                    continue
                scale_stack = scalemod.build(scalemod.QUICK if quick else scalemod.FULL, log)
                config_objs.append(suitemod.Config(
                    "scale", scale_stack, suitemod.fstype_of(scale_stack.root), chosen))
            elif name == "debian":
                chosen = select(workloads=debian_workloads)
                if not chosen:
                    continue
                try:
                    debian_stack = debianmod.build(log=log)
                except (OSError, debianmod.BuildError) as e:
                    log(f"debian: skipped: {e}")
                    skipped_configs.append(("debian", str(e)))
                    continue
                config_objs.append(suitemod.Config(
                    "debian", debian_stack, suitemod.fstype_of(debian_stack.root), chosen))
            else:
                chosen = select(XFS_GROUPS)
                if quick:  # the smoke run keeps to the data copy-ups there
                    chosen = [w for w in chosen if w.name.startswith("append-")]
                if not chosen:
                    continue
                try:
                    xfs_stack, cleanup = suitemod.xfs_config(base, log)
                except (OSError, subprocess.CalledProcessError) as e:
                    # report it and carry on with the other configuration
                    log(f"xfs-reflink: skipped: {e}")
                    skipped_configs.append(("xfs-reflink", str(e)))
                    continue
                cleanups.append(cleanup)
                config_objs.append(suitemod.Config("xfs-reflink", xfs_stack,
                                                   suitemod.fstype_of(xfs_stack.root), chosen))
        runner = suitemod.Suite(
            config_objs, targets, out_dir, quick,
            reps or (1 if quick else 5), heavy_reps or (1 if quick else 5),
            timeout or (60 if quick else 600), log)
        runner.run(skipped_configs)
    finally:
        for cleanup in cleanups:
            cleanup()
    info = {
        "started": started_at, "kernel": runner.kernel, "commit": runner.commit,
        "stack": base and os.path.basename(base.root),
        "merged_files": base and base.meta["regular_files"],
        "quick": quick, "reps": runner.reps, "heavy_reps": runner.heavy_reps,
        "versions": runner.versions, "elapsed_s": time.monotonic() - started,
        "configs": [c.name for c in config_objs],
    }
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(info, f, indent=1)
    records = runner.records
    charts = report.write_charts(records, out_dir)
    report.write_summary(records, out_dir, info)
    if extras:
        section = extrasmod.run(extras, reps or (3 if quick else 15), out_dir, log)
        with open(os.path.join(out_dir, "summary.md"), "a") as f:
            f.write("\n" + section)
    log(f"bench: {len(records)} records, {len(charts)} charts, summary in "
        f"{os.path.join(out_dir, 'summary.md')} ({info['elapsed_s']:.0f} s)")
