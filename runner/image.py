"""The image side of `unionfs run IMAGE`: the store's image as the run's layers
and process settings, and the container that holds its upper.

- `find_image(store, ref, policy, pull)`: the image in the store, pulled
  first as `--pull=missing|always|never` says (`pull(ref)` is the caller's:
  the command line draws the progress).
- `settings(config, ...)`: the image's run config (Entrypoint, Cmd, Env,
  WorkingDir, User) with the command line's overrides, as docker does:
  CMD args replace Cmd; `--entrypoint` replaces Entrypoint and clears Cmd
  (`--entrypoint ''` clears both); `-e` overrides Env; `-w` WorkingDir;
  `-u` User. Pure: tested without a store.
- `ContainerRun`: the container record of one run (unionfs.image.containers),
  opened by runner.run.execute with signals held back, locked while the run
  lives, and closed with the exit status after the teardown: kept with
  `--name`, removed otherwise.

The layers reach the plan only through the store's LayerSource interface
(`layer.lowerdir()`), never through paths built here. This module imports
unionfs.image (the store, formats, containers) only inside its functions:
`unionfs run --lower` never loads it.
"""


class ImageError(Exception):
    """The image cannot be run as asked (one line)."""


PULL_POLICIES = ("missing", "always", "never")


def _is_id(ref):
    """An image id or digest, which only the store can know (never pulled)."""
    hexpart = ref[7:] if ref.startswith("sha256:") else ref
    return (ref.startswith("sha256:") or len(hexpart) == 64) and \
        all(c in "0123456789abcdef" for c in hexpart)


def find_image(store, ref, policy, pull):
    """The store's Image for `ref`; `pull(ref)` (returning the Image) when the
    policy asks for it: `always`, or `missing` and not in the store."""
    from unionfs.image.store import StoreError
    if policy not in PULL_POLICIES:
        raise ValueError(policy)
    if policy != "always":
        try:
            return store.resolve(ref)
        except StoreError as e:
            if policy == "never" or _is_id(ref):
                raise ImageError(f"{e}" + (" (--pull=never)" if policy == "never" else "")) \
                    from None
    elif _is_id(ref):
        raise ImageError(f"{ref}: an image id cannot be pulled (--pull=always)")
    return pull(ref)


def layer_dirs(image):
    """The image's layers as lower dirs, top first (LayerSource.lowerdir())."""
    return [layer.lowerdir() for layer in image.layers]


def _strings(config, key):
    value = config.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"the image's config has a bad {key} (not a list of strings)")
    return value


def _string(config, key):
    value = config.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ImageError(f"the image's config has a bad {key} (not a string)")
    return value


def settings(config, entrypoint=None, args=(), workdir=None, user=None):
    """(argv, Env list, working dir, user spec or None) for a run of an image
    whose run config is `config`, with the command line's overrides."""
    if not isinstance(config, dict):
        raise ImageError("the image's config is not an object")
    if entrypoint is not None:
        head, cmd = ([entrypoint] if entrypoint else []), []
    else:
        head, cmd = _strings(config, "Entrypoint"), _strings(config, "Cmd")
    if args:
        cmd = list(args)
    argv = head + cmd
    if not argv:
        raise ImageError("the image has no command (no Entrypoint or Cmd): give one after "
                         "the image")
    env = _strings(config, "Env")
    if workdir is None:
        workdir = _string(config, "WorkingDir") or "/"
        workdir = "/" + workdir.lstrip("/") if not workdir.startswith("/") else workdir
    if user is None:
        user = _string(config, "User") or None
    return argv, env, workdir, user


class ContainerRun:
    """One run's container in the store: created (and locked) by open(),
    finished by close(status); `keep` (a --name) keeps it afterwards."""

    def __init__(self, store, image, ref, name=None, command=None):
        self.store, self.image, self.ref = store, image, ref
        self.name, self.command = name, command
        self.keep = name is not None
        self.container = None
        self.lock = None

    def open(self):
        from unionfs.image import containers
        from unionfs.image.store import StoreError
        try:
            self.container, self.lock = containers.start(
                self.store, self.image, self.ref, self.name, self.command, durable=self.keep)
        except (StoreError, OSError) as e:
            raise ImageError(f"cannot create the container: {_describe(e)}") from None
        c = self.container
        return {"upper": c.upper, "work": c.work,
                "container": f"container {c.name}" + ("" if self.keep else
                                                        " (removed when it exits)")}

    def close(self, status):
        """After the teardown: the exit recorded (kept) or the container
        removed. Returns one-line problems (empty when all went well)."""
        if self.container is None:
            return []
        from unionfs.image import containers
        try:
            containers.finish(self.store, self.container, self.lock, status,
                              remove=not self.keep)
        except Exception as e:  # noqa: BLE001 - the run is over: report, never raise
            return [f"container {self.container.name}: {_describe(e)}"]
        finally:
            self.container = None
        return []


def _describe(error):
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename + ': ' if isinstance(error.filename, str) else ''}" \
               f"{error.strerror}"
    return str(error) or type(error).__name__

