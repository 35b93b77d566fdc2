"""Image commands: `unionfs load|save|commit|images|image inspect|rm|prune|ps|rm`.

Each takes `--store DIR` (or $UNIONFS_STORE; default /var/lib/unionfs with
privileges, else $XDG_DATA_HOME/unionfs). Errors are one line, exit 1; usage
errors exit 2 (click). `pull` and `push` live in unionfs.cli.registry and
are re-exported here for the command table.
"""
import json
import sys
import time

import click


def _store_option(f):
    return click.option("--store", "store_path", metavar="DIR", envvar="UNIONFS_STORE",
                        help="The image store (default: $UNIONFS_STORE, else "
                             "/var/lib/unionfs as root, $XDG_DATA_HOME/unionfs otherwise).")(f)


def _errors():
    from unionfs.image.applier import LayerError
    from unionfs.image.archive import ArchiveError
    from unionfs.image.digest import DigestError
    from unionfs.image.formats import FormatError
    from unionfs.image.reference import ReferenceError
    from unionfs.image.store import StoreError
    from unionfs.image.tarsplit import TarSplitError
    return (LayerError, ArchiveError, DigestError, FormatError, ReferenceError, StoreError,
            TarSplitError, OSError)


def _fail(name: str, e: Exception):
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        text = f"{where}: {e.strerror}" if where else e.strerror
    else:
        text = str(e) or type(e).__name__
    click.echo(f"unionfs {name}: {text}", err=True)
    sys.exit(1)


def _run(name: str, fn):
    errors = _errors()
    try:
        return fn()
    except errors as e:
        _fail(name, e)


def _open(store_path):
    from unionfs.image.store import Store
    return Store.open(store_path)


def _short(digest: str, n: int = 12) -> str:
    return digest.split(":", 1)[-1][:n]


def _age(t: float) -> str:
    d = max(0, time.time() - t)
    for unit, secs in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if d >= secs:
            return f"{int(d // secs)} {unit} ago"
    return "just now"


@click.command("load")
@click.option("-i", "--input", "path", required=True, metavar="FILE|DIR",
              help="docker-archive, OCI archive or OCI layout directory.")
@click.option("--name", "default_name", metavar="NAME",
              help="Repository for OCI images whose ref annotation is only a tag.")
@click.option("-q", "--quiet", is_flag=True)
@_store_option
def load(path, default_name, quiet, store_path):
    """Load images from an archive or an OCI layout into the store."""
    def go():
        from unionfs.image import archive
        store = _open(store_path)
        for item in archive.load(store, path, default_name):
            if not quiet:
                what = ", ".join(item.names) or _short(item.image_id)
                click.echo(f"Loaded image: {what}")
    _run("load", go)


@click.command("save")
@click.option("-o", "--output", "out", required=True, metavar="FILE")
@click.option("--format", "fmt", type=click.Choice(["oci-archive", "docker-archive"]),
              default="oci-archive", show_default=True)
@click.argument("refs", nargs=-1, required=True)
@_store_option
def save(out, fmt, refs, store_path):
    """Write images to an archive."""
    def go():
        from unionfs.image import archive
        archive.save(_open(store_path), list(refs), out, fmt)
    _run("save", go)


@click.command("commit")
@click.option("--compression", type=click.Choice(["gzip", "zstd", "none"]), default="gzip",
              show_default=True)
@click.option("-m", "--message", help="A comment for the image's history.")
@click.option("-a", "--author")
@click.argument("container")
@click.argument("ref", required=False)
@_store_option
def commit(compression, message, author, container, ref, store_path):
    """Make a new image from a container's changes (its upper layer)."""
    def go():
        from unionfs.image import commit as commit_mod
        store = _open(store_path)
        digest = commit_mod.commit(store, container, [ref] if ref else [], compression,
                                   message, author)
        click.echo(store.resolve(digest).id)
    _run("commit", go)


@click.command("images")
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.option("--no-trunc", is_flag=True)
@_store_option
def images(quiet, no_trunc, store_path):
    """List the images in the store."""
    def go():
        store = _open(store_path)
        n = 64 if no_trunc else 12
        rows = []
        for image in store.images():
            size = sum(layer.info()["size"] for layer in image.layers)
            for name in image.names or ("<none>:<none>",):
                repo, _, tag = name.rpartition(":") if name != "<none>:<none>" \
                    else ("<none>", "", "<none>")
                rows.append((repo, tag, _short(image.id, n), _age(image.loaded),
                             _size(size)))
        if quiet:
            for r in dict.fromkeys(r[2] for r in rows):
                click.echo(r)
            return
        _table(("REPOSITORY", "TAG", "IMAGE ID", "LOADED", "SIZE"), rows)
    _run("images", go)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


@click.group("image")
def image():
    """Inspect and remove images."""


@image.command("inspect")
@click.argument("refs", nargs=-1, required=True)
@_store_option
def image_inspect(refs, store_path):
    """Show images as JSON (manifest, config, layers top first)."""
    def go():
        store = _open(store_path)
        out = []
        for ref in refs:
            img = store.resolve(ref)
            out.append({
                "Id": img.id, "Digest": img.manifest_digest, "Names": list(img.names),
                "ManifestMediaType": img.manifest.media_type,
                "Manifest": img.manifest.raw, "Config": img.config.raw,
                "Layers": [{"DiffID": layer.diff_id, "Dir": layer.lowerdir(),
                            "Size": layer.info()["size"]} for layer in img.layers],
            })
        click.echo(json.dumps(out, indent=2))
    _run("image inspect", go)


@image.command("rm")
@click.option("-f", "--force", is_flag=True, help="Remove even if a container uses it.")
@click.argument("refs", nargs=-1, required=True)
@_store_option
def image_rm(force, refs, store_path):
    """Remove images (a name of an image with other names is only untagged)."""
    def go():
        from unionfs.image import gc
        store = _open(store_path)
        for ref in refs:
            removed = gc.remove_image(store, ref, force)
            for name in removed.untagged:
                click.echo(f"Untagged: {name}")
            for digest in removed.images:
                click.echo(f"Deleted: {digest}")
    _run("image rm", go)


@image.command("prune")
@click.option("-a", "--all", "all_images", is_flag=True,
              help="Remove every image no container uses, not only unnamed ones.")
@_store_option
def image_prune(all_images, store_path):
    """Remove unused images, then every layer and blob nothing uses."""
    def go():
        from unionfs.image import gc
        removed = gc.prune(_open(store_path), all_images)
        for digest in removed.images:
            click.echo(f"Deleted: {digest}")
        click.echo(f"Removed {len(removed.images)} images, {len(removed.layers)} layers, "
                   f"{len(removed.blobs)} blobs")
    _run("image prune", go)


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also containers not running.")
@click.option("-q", "--quiet", is_flag=True, help="Only container ids.")
@click.option("-m", "--mounts", "show_mounts", is_flag=True,
              help="List unionfs mounts instead: this namespace's and the daemon's.")
@click.option("--socket", "socket_path", metavar="PATH", help="The daemon's API socket.")
@_store_option
def ps(show_all, quiet, show_mounts, socket_path, store_path):
    """List containers (or, with --mounts, unionfs mounts)."""
    if show_mounts:
        from . import daemon
        rows = daemon.mount_rows(socket_path)
        click.echo("\n".join(r[0] for r in rows) if quiet else daemon.mount_table(rows))
        return

    def go():
        from unionfs.image import containers
        rows = []
        for c in containers.list_all(_open(store_path)):
            running = c.is_running()
            if not (show_all or running):
                continue
            if running:
                status = "Up"
            elif c.state == "exited":
                status = f"Exited ({c.exit_code if c.exit_code is not None else '?'})"
            elif c.state == "running":
                status = "Exited (?)"       # its run was killed: nobody holds the lock
            else:
                status = "Created"
            command = " ".join(c.command or (c.config.get("Entrypoint") or [])
                               + (c.config.get("Cmd") or []))
            rows.append((c.id[:12], c.image, command[:30], _age(c.created), status, c.name))
        if quiet:
            for r in rows:
                click.echo(r[0])
            return
        _table(("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"), rows)
    _run("ps", go)


@click.command("rm")
@click.option("-f", "--force", is_flag=True,
              help="Stop a running one first (SIGTERM to its unionfs run; SIGKILL after 10 s).")
@click.argument("containers_", metavar="CONTAINER...", nargs=-1, required=True)
@_store_option
def rm(force, containers_, store_path):
    """Remove containers (their upper layers). A running one (its `unionfs run`
    holds the container's lock) is refused without -f."""
    def go():
        from unionfs.image import containers
        store = _open(store_path)
        for key in containers_:
            click.echo(containers.remove(store, key, force).name)
    _run("rm", go)


def __getattr__(name):
    # the command table points every image command here; pull and push are
    # the registry client's (unionfs.cli.registry)
    if name in ("pull", "push"):
        try:
            from . import registry
        except ImportError:
            raise AttributeError(name) from None
        return getattr(registry, name)
    raise AttributeError(name)
