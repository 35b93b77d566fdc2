"""`unionfs run`: the runner's command line (runner/ is the runner itself).

Two forms: `unionfs run [OPTIONS] IMAGE [CMD ARG...]` runs an image of the
store (pulled first if missing, `--pull`), with its config's Entrypoint,
Cmd, Env, WorkingDir and User unless overridden; `unionfs run --lower DIR
... -- CMD` (or `--rootfs DIR`) runs a layer stack given as directories. The
image code (the store, formats, the registry client) is imported only for
the first form.

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

RUN_USAGE = ("unionfs run [OPTIONS] IMAGE [CMD ARG...] | "
             "unionfs run --lower DIR [--lower DIR ...] [OPTIONS] -- CMD [ARG ...]")
IMAGE_ONLY = ("name", "entrypoint", "pull", "tls_verify", "creds", "platform", "store_path",
              "quiet")
STACK_ONLY = ("upper", "work", "keep")


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
              help="A read-only layer; repeat, top layer first (instead of an IMAGE).")
@click.option("--upper", metavar="DIR", help="The writable layer (default: a throwaway one).")
@click.option("--work", metavar="DIR", help="Work dir for --upper, on the same filesystem.")
@click.option("--rootfs", metavar="DIR",
              help="Use DIR (e.g. an already mounted stack) as the root; no union is mounted.")
@click.option("--name", metavar="NAME",
              help="Keep the image's container (its upper, in the store) under this name.")
@click.option("--entrypoint", metavar="CMD",
              help="Replace the image's Entrypoint (and clear its Cmd); '' clears it.")
@click.option("--pull", type=click.Choice(["missing", "always", "never"]), default="missing",
              show_default=True, help="Pull the image from its registry first.")
@click.option("--tls-verify", type=click.BOOL, default=True, metavar="BOOL",
              help="For a pull: verify the registry's TLS certificate (false also allows "
                   "plain HTTP). Give it as --tls-verify=false.")
@click.option("--creds", metavar="USER:PASS", help="For a pull: the registry's credentials.")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="For a pull: the image to take from a multi-platform index.")
@click.option("--store", "store_path", metavar="DIR", envvar="UNIONFS_STORE",
              help="The image store (default: $UNIONFS_STORE, else /var/lib/unionfs as root, "
                   "$XDG_DATA_HOME/unionfs otherwise).")
@click.option("-q", "--quiet", is_flag=True, help="No pull progress.")
@click.option("--hostname", default="unionfs", show_default=True, metavar="NAME",
              help="Hostname inside the container.")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE",
              help="Set a variable (KEY alone: take the host's value).")
@click.option("-w", "--workdir", metavar="DIR",
              help="Working directory inside (default: the image's, else /).")
@click.option("-u", "--user", metavar="USER[:GROUP]",
              help="Run the command as this user: numbers or names of the container's "
                   "/etc/passwd and /etc/group (default: the image's, else 0:0).")
@click.option("--net", default="none", metavar="none|host",
              help="none: only loopback (default); host: the host's network.")
@click.option("-v", "--volume", "volumes", multiple=True, metavar="SRC:DST[:ro]",
              help="Bind-mount a host path into the container.")
@click.option("--keep", is_flag=True, help="Keep the throwaway upper layer and print where.")
@click.option("--dry-run", is_flag=True,
              help="Print what the run would do, one line a step, and exit.")
@click.argument("args", nargs=-1, metavar="IMAGE [CMD ARG ...] | -- CMD [ARG ...]")
@click.pass_context
def run(ctx, lowers, upper, work, rootfs, name, entrypoint, pull, tls_verify, creds, platform,
        store_path, quiet, hostname, env, workdir, user, net, volumes, keep, dry_run, args):
    """Run a command in its own namespaces on an image, or on a rootfs built from layers.

    With an IMAGE (a name of the store, an id, or a reference to pull) the
    image's Entrypoint, Cmd, Env, WorkingDir and User apply unless
    overridden; CMD replaces the image's Cmd. The first --lower is the top
    layer. Without --upper (or --name for an image) the upper is thrown
    away afterwards. Exit status: the command's (128+N if killed by signal
    N, 127 not found, 126 not executable); 2 for bad options; 1 if the run
    could not be set up.
    """
    def given(option):  # on the command line ($UNIONFS_STORE is no mistake)
        return ctx.get_parameter_source(option) == click.core.ParameterSource.COMMANDLINE

    common = dict(hostname=hostname, env=env, user=user, net=net, volumes=volumes)
    try:
        if lowers or rootfs is not None:
            wrong = [o for o in IMAGE_ONLY if given(o)]
            if wrong:
                raise PlanError(f"--{wrong[0].replace('_path', '').replace('_', '-')} is "
                                "for an IMAGE, not for --lower or --rootfs")
            plan = build_plan(args, lowers=lowers, upper=upper, work=work, rootfs=rootfs,
                              workdir=workdir or "/", keep=keep, **common)
            container = None
        else:
            wrong = [o for o in STACK_ONLY if given(o)]
            if wrong:
                raise PlanError(f"--{wrong[0]} is for a layer stack (--lower); an image's "
                                "container keeps its upper with --name NAME")
            if not args:
                raise PlanError("missing IMAGE (or --lower DIR ... -- CMD)")
            plan, container = _image_plan(args, name, entrypoint, pull, tls_verify, creds,
                                          platform, store_path, quiet, workdir, dry_run, common)
        if dry_run:
            process.discard_spare()
            click.echo("\n".join(plan.describe()))
            return
        from runner.image import ImageError
        from runner.run import RunError, execute
    except PlanError as e:
        process.discard_spare()
        raise RunUsageError(str(e)) from None
    except KeyboardInterrupt:
        process.discard_spare()
        raise SystemExit(130) from None  # nothing exists yet: just stop, as a shell would
    except click.ClickException:
        process.discard_spare()
        raise
    try:
        status = execute(plan, announce=lambda message: click.echo(
            f"unionfs run: {message}", err=True), container=container)
    except (RunError, ImageError) as e:
        raise RunFailure(str(e)) from None
    finally:
        process.discard_spare()  # a server process started early but not used
    if prestart.is_console_run():
        exit_now(status)
    raise SystemExit(status)


def _image_plan(args, name, entrypoint, pull, tls_verify, creds, platform, store_path, quiet,
                workdir, dry_run, common):
    """The plan for `unionfs run IMAGE [CMD ...]` and its ContainerRun (None for
    --dry-run, which creates nothing and never pulls)."""
    from runner import image as image_run

    from ..image.digest import DigestError
    from ..image.formats import FormatError
    from ..image.store import Store, StoreError
    ref, cmd = args[0], list(args[1:])
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if name is not None:
        from ..image.containers import valid_name
        if not valid_name(name):
            raise PlanError(f"bad --name {name!r}: letters, digits and _.-, starting with a "
                            "letter or digit")
    try:
        store = Store.open(store_path)
        policy = "never" if dry_run else pull
        image = image_run.find_image(store, ref, policy, lambda r: _pull(
            store, r, tls_verify, creds, platform, quiet))
        argv, image_env, image_workdir, image_user = image_run.settings(
            image.config.run_config, entrypoint, cmd, workdir, common["user"])
    except (image_run.ImageError, StoreError, FormatError, DigestError, OSError) as e:
        raise RunFailure(_one_line(e)) from None
    label = f"{ref} ({image.id.split(':')[1][:12]})"
    plan = build_plan(argv, lowers=image_run.layer_dirs(image), workdir=image_workdir,
                      base_env=image_env, image=label,
                      container=f"a new container {name or '(named at random)'}"
                      + ("" if name else ", removed when it exits"),
                      **dict(common, user=image_user))
    return plan, image_run.ContainerRun(store, image, ref, name, list(argv))


def _pull(store, ref, tls_verify, creds, platform, quiet):
    """`unionfs pull` from inside `unionfs run` (progress on stderr unless -q)."""
    from ..image import pull as pull_mod
    from ..image.registry import RegistryError
    from . import registry
    reference = registry._reference("run", ref)
    try:
        chosen = pull_mod.Platform.parse(platform) if platform else None
    except RegistryError as e:
        raise RunUsageError(str(e)) from None
    creds = registry._creds("run", creds)
    if not quiet:
        click.echo(f"unionfs run: pulling {reference}", err=True)

    async def go(progress):
        return await pull_mod.pull(store, reference, tls_verify=tls_verify, creds=creds,
                                   platform=chosen, progress=progress)
    return registry._run("run", go, progress=registry._progress(quiet, "pulling"))


def _one_line(e):
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e) or type(e).__name__


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
