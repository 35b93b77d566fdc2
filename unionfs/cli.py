"""Command line: `unionfs mount|umount|run|bench` and the `fuse-unionfs` drop-in.

Subcommands that pull in heavy modules (the runner, the benchmark suite) are
loaded lazily, so that `fuse-unionfs` and `unionfs mount` start fast.
"""
import importlib

import click

LAZY_COMMANDS = {
    "run": "runner.cli:run",
    "bench": "bench.cli:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup)
@click.version_option(package_name="unionfs")
def main():
    """unionfs: a layered (union) filesystem in userspace."""


def fuse_main():
    raise SystemExit("fuse-unionfs: not yet")
