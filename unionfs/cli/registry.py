"""`unionfs pull` and `unionfs push`: the command line of the registry client.

Progress goes to stderr: per-layer bars (rich) on a terminal, one line when
a layer starts and one when it ends otherwise, nothing with -q. The image id
(pull) or manifest digest (push) goes to stdout. Every failure is one line
and exit status 1; a usage error is one line and status 2. trio, httpx and
rich are imported only once a command runs.
"""
import sys
import time

import click


class Failure(click.ClickException):
    """One line on stderr: `unionfs pull: ...`."""
    exit_code = 1

    def __init__(self, command: str, message: str):
        super().__init__(message)
        self.command = command

    def show(self, file=None):
        click.echo(f"unionfs {self.command}: {self.format_message()}", err=True)


class UsageFailure(Failure):
    exit_code = 2


class OneLineCommand(click.Command):
    """click's usage errors as one line, status 2."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise UsageFailure(self.name, e.format_message()) from None


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


class PlainProgress:
    """A line when an item starts and one when it ends (logs, pipes)."""

    def __init__(self, verb: str):
        self.verb = verb
        self.items = {}

    def start(self, key, total, what):
        self.items[key] = (time.monotonic(), total, what)

    def advance(self, key, n):
        pass

    def finish(self, key, status):
        started, total, what = self.items.get(key, (time.monotonic(), 0, "blob"))
        if status in ("failed", "cancelled"):
            return      # the command's one error line says what went wrong
        if status in ("done", "uploaded"):
            took = time.monotonic() - started
            click.echo(f"{what} {_short(key)}: {status}, {_size(total)} in {took:.1f} s", err=True)
        else:
            click.echo(f"{what} {_short(key)}: {status}", err=True)


class RichProgress:
    """A bar per item on a terminal."""

    def __init__(self, verb: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(),
                                 TextColumn("{task.fields[status]}"),
                                 console=Console(stderr=True), transient=False)
        self.tasks = {}
        self.verb = verb

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start(self, key, total, what):
        self.tasks[key] = self.progress.add_task(f"{what} {_short(key)}", total=total,
                                                 status=self.verb)

    def advance(self, key, n):
        self.progress.advance(self.tasks[key], n)

    def finish(self, key, status):
        task = self.tasks[key]
        if status in ("done", "uploaded", "exists", "mounted"):
            self.progress.update(task, completed=self.progress.tasks[task].total, status=status)
        else:
            self.progress.update(task, status=status)


class _Quiet:
    def start(self, key, total, what):
        pass

    def advance(self, key, n):
        pass

    def finish(self, key, status):
        pass


def _progress(quiet: bool, verb: str):
    if quiet:
        return _Quiet()
    if sys.stderr.isatty():
        return RichProgress(verb)
    return PlainProgress(verb)


def _creds(name, text):
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise UsageFailure(name, "--creds takes USER:PASS")
    return user, password


def _run(name, fn, *args, **kwargs):
    """Run an async pull/push; known failures become one line and status 1."""
    import trio

    from ..image import applier, digest, formats, pull, reference, registry, store, tarsplit
    known = (registry.RegistryError, pull.LayerFailed, formats.FormatError, digest.DigestError,
             store.StoreError, applier.LayerError, reference.ReferenceError,
             tarsplit.TarSplitError, OSError)
    progress = kwargs.get("progress")
    try:
        if hasattr(progress, "__enter__"):
            with progress:
                return trio.run(lambda: fn(*args, **kwargs))
        return trio.run(lambda: fn(*args, **kwargs))
    except known as e:
        message = str(e) if not isinstance(e, OSError) or not e.strerror else \
            f"{str(e.filename) + ': ' if e.filename else ''}{e.strerror}"
        raise Failure(name, registry.printable(message, 400)) from None
    except KeyboardInterrupt:
        click.echo(f"unionfs {name}: interrupted", err=True)
        sys.exit(130)


def _reference(name, text):
    from ..image import reference
    try:
        return reference.parse(text)
    except reference.ReferenceError as e:
        raise UsageFailure(name, str(e)) from None


def _store(name, path):
    from ..image.store import Store, StoreError
    try:
        return Store.open(path)
    except (StoreError, OSError) as e:
        raise Failure(name, str(e)) from None


tls_option = click.option(
    "--tls-verify", type=click.BOOL, default=True, is_flag=False, flag_value=True,
    metavar="BOOL", help="Verify the registry's TLS certificate (false also allows plain HTTP).")
creds_option = click.option("--creds", metavar="USER:PASS",
                            help="Credentials for the registry (basic or token auth).")
store_option = click.option("--store", "store_path", metavar="DIR", envvar="UNIONFS_STORE",
                            help="The image store (default: $UNIONFS_STORE or the system's).")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress output.")


@click.command("pull", cls=OneLineCommand)
@tls_option
@creds_option
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="The image to take from a multi-platform index (default: this host's).")
@store_option
@quiet_option
@click.argument("ref")
def pull(tls_verify, creds, platform, store_path, quiet, ref):
    """Pull the image REF from its registry into the store."""
    from ..image import pull as pull_mod
    from ..image.registry import RegistryError
    reference = _reference("pull", ref)
    try:
        chosen = pull_mod.Platform.parse(platform) if platform else None
    except RegistryError as e:
        raise UsageFailure("pull", str(e)) from None
    creds = _creds("pull", creds)
    store = _store("pull", store_path)

    async def go(progress):
        return await pull_mod.pull(store, reference, tls_verify=tls_verify, creds=creds,
                                   platform=chosen, progress=progress)
    progress = _progress(quiet, "pulling")
    image = _run("pull", go, progress=progress)
    click.echo(image.id)


@click.command("push", cls=OneLineCommand)
@tls_option
@creds_option
@click.option("--chunk-size", type=click.IntRange(1 << 16), metavar="BYTES",
              help="Upload blobs in PATCH chunks of this size (default: one PUT per blob).")
@store_option
@quiet_option
@click.argument("ref")
@click.argument("dest", required=False)
def push(tls_verify, creds, chunk_size, store_path, quiet, ref, dest):
    """Push the store's image REF to DEST (default: REF's own name)."""
    from ..image import push as push_mod
    target = _reference("push", dest or ref)
    creds = _creds("push", creds)
    store = _store("push", store_path)

    async def go(progress):
        return await push_mod.push(store, ref, target, tls_verify=tls_verify, creds=creds,
                                   progress=progress, chunk_size=chunk_size)
    progress = _progress(quiet, "pushing")
    digest = _run("push", go, progress=progress)
    click.echo(digest)
