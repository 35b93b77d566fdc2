"""`unionfs run`: the runner's command line (runner/ is the runner itself).

Every option error is one line on stderr and exit status 2; a run that cannot
be carried out is one line and status 1; otherwise the status is the
command's own (127 not found, 126 not executable, 128+N killed by signal N).
"""
import os
import sys

import click

from runner import prestart
from runner.plan import PlanError, build_plan

from ..serve import process

RUN_USAGE = ("unionfs run --lower DIR [--lower DIR ...] [--upper DIR --work DIR] [OPTIONS] "
             "-- CMD [ARG ...]")


class RunUsageError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"unionfs run: {self.format_message()} (usage: {RUN_USAGE})", err=True)


class RunFailure(click.ClickException):
    exit_code = 1

    def show(self, file=None):
        click.echo(f"unionfs run: {self.format_message()}", err=True)


class RunCommand(click.Command):
    """Turns click's multi-line usage errors into one line."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise RunUsageError(e.format_message()) from None


@click.command(cls=RunCommand, context_settings={"allow_interspersed_args": False,
                                                 "help_option_names": ["--help"]})
@click.option("--lower", "lowers", multiple=True, metavar="DIR",
              help="A read-only layer; repeat, top layer first.")
@click.option("--upper", metavar="DIR", help="The writable layer (default: a throwaway one).")
@click.option("--work", metavar="DIR", help="Work dir for --upper, on the same filesystem.")
@click.option("--rootfs", metavar="DIR",
              help="Use DIR (e.g. an already mounted stack) as the root; no union is mounted.")
@click.option("--hostname", default="unionfs", show_default=True, metavar="NAME",
              help="Hostname inside the container.")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE",
              help="Set a variable (KEY alone: take the host's value).")
@click.option("-w", "--workdir", default="/", metavar="DIR", help="Working directory inside.")
@click.option("-u", "--user", metavar="UID[:GID]", help="Run the command as this user.")
@click.option("--net", default="none", metavar="none|host",
              help="none: only loopback (default); host: the host's network.")
@click.option("-v", "--volume", "volumes", multiple=True, metavar="SRC:DST[:ro]",
              help="Bind-mount a host path into the container.")
@click.option("--keep", is_flag=True, help="Keep the throwaway upper layer and print where.")
@click.option("--dry-run", is_flag=True,
              help="Print what the run would do, one line a step, and exit.")
@click.argument("command", nargs=-1, metavar="-- CMD [ARG ...]")
def run(lowers, upper, work, rootfs, hostname, env, workdir, user, net, volumes, keep, dry_run,
        command):
    """Run a command in its own namespaces on a rootfs built from layers.

    The first --lower is the top layer. Without --upper a throwaway upper is
    used and removed afterwards. Exit status: the command's (128+N if killed
    by signal N, 127 not found, 126 not executable); 2 for bad options.
    """
    try:
        plan = build_plan(command, lowers=lowers, upper=upper, work=work, rootfs=rootfs,
                          hostname=hostname, env=env, workdir=workdir, user=user, net=net,
                          volumes=volumes, keep=keep)
        if dry_run:
            process.discard_spare()
            click.echo("\n".join(plan.describe()))
            return
        from runner.run import RunError, execute
    except PlanError as e:
        process.discard_spare()
        raise RunUsageError(str(e)) from None
    except KeyboardInterrupt:
        process.discard_spare()
        raise SystemExit(130) from None  # nothing exists yet: just stop, as a shell would
    try:
        status = execute(plan, announce=lambda message: click.echo(
            f"unionfs run: {message}", err=True))
    except RunError as e:
        raise RunFailure(str(e)) from None
    finally:
        process.discard_spare()  # a server process started early but not used
    if prestart.is_console_run():
        exit_now(status)
    raise SystemExit(status)


def exit_now(status):
    """Exit without the interpreter's finalization (~10 ms of tearing down modules).

    Only once the run is over: the union is unmounted, its server reaped,
    the state dir removed and no other process of ours is left. Python's own
    exit would only flush stdio; as it does, a failed flush gives status 120.
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        status = 120
    os._exit(status)
