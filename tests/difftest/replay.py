"""Replay one differential seed: `python -m tests.difftest.replay SEED [options]`.

Runs the seed's stack and ops on kernel overlayfs and the target, prints the
divergence report (seed, every op with both results, the differences) or
"no divergence". With --bisect an end-of-run difference is narrowed to the op
that caused it; with --keep the layer copies stay on disk for inspection.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import click

from . import harness, mounts


@click.command()
@click.argument("seeds", nargs=-1, type=int, required=True)
@click.option("--ops", "nops", default=60, show_default=True, help="ops per seed")
@click.option("--target", type=click.Choice(mounts.TARGETS), show_default=True,
              default=lambda: os.environ.get("UNIONFS_DIFF_TARGET", "unionfs"))
@click.option("--bisect/--no-bisect", default=True, show_default=True,
              help="narrow an end-of-run divergence to its op")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="keep the layers under this directory")
@click.option("--no-remount-check", is_flag=True, help="skip the kernel remount of the upper")
@click.option("--ignore", multiple=True, help="leave this entry field out (e.g. nlink, mtime)")
@click.option("--split-fs", is_flag=True, help="each lower layer on its own tmpfs")
@click.option("--snapshot", metavar="GITREV", default=None,
              help="serve unionfs from this commit (git archive), not the working tree")
def main(seeds, nops, target, bisect, keep, no_remount_check, ignore, split_fs, snapshot):
    """Replay SEEDS (one or more) against kernel overlayfs."""
    if os.geteuid() != 0:
        raise click.UsageError("needs root (mounts overlay and FUSE filesystems)")
    snapshot_dir = _export_snapshot(snapshot) if snapshot else None
    if snapshot_dir:
        os.environ["UNIONFS_DIFF_PYTHONPATH"] = snapshot_dir
    failed = 0
    for seed in seeds:
        base = keep or tempfile.mkdtemp(prefix=f"difftest-{seed}-")
        workdir = os.path.join(base, f"seed{seed}") if keep else base
        os.makedirs(workdir, exist_ok=True)
        try:
            kw = dict(remount_check=not no_remount_check, ignore=tuple(ignore), split_fs=split_fs)
            div = (harness.first_divergence(seed, nops, workdir, target, **kw) if bisect
                   else harness.run_seed(seed, nops, workdir, target, **kw))
        finally:
            if not keep:
                shutil.rmtree(base, ignore_errors=True)
        if div is None:
            click.echo(f"seed {seed}: no divergence in {nops} ops ({target})")
        else:
            failed += 1
            click.echo(div.report())
    if snapshot_dir:
        shutil.rmtree(snapshot_dir, ignore_errors=True)
    sys.exit(1 if failed else 0)


def _export_snapshot(rev):
    """Unpack the unionfs package as of `rev` into a temp dir; return that dir."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dest = tempfile.mkdtemp(prefix="difftest-unionfs-")
    archive = subprocess.run(["git", "-C", repo, "archive", rev, "unionfs"],
                             capture_output=True)
    if archive.returncode != 0:
        raise click.UsageError(f"git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return dest


if __name__ == "__main__":
    main()
