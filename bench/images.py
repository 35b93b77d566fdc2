"""Image benchmarks: pull, push again, load and commit, each next to its peer.

Workloads (median of N interleaved rounds; fresh destination every round):

- pull-generated / pull-debootstrap: `unionfs pull` from a loopback
  docker-registry to a runnable container (pull + container record) against
  `skopeo copy docker://... oci:...` + `umoci unpack`. The generated image is
  ~150 MB in ~8,000 files over 4 gzip layers; the real one is a
  `debootstrap --variant=minbase bookworm` rootfs in one layer.
- blobs-*: the layer blobs alone (fetched in parallel, hashed, written to
  the store, verified), compressed MB/s; http-only: the same GETs with the
  bytes dropped, the client's ceiling.
- push-again: pushing an unchanged image once more, in-process and with the
  CLI, against `skopeo copy` of the same image to the same tag.
- load-docker-archive: `unionfs load` of a docker-archive against
  `skopeo copy docker-archive:... oci:...` + `umoci unpack`.
- commit-1000: committing a container with 1,000 changed files: `unionfs
  commit` against `podman commit` with fuse-overlayfs as mount program.

Images and the registry's data are built once and kept in --cache
(/var/tmp/unionfs-bench-images). The registry and the image builders are the
tests' (tests/images/registry_fixture.py, from the source checkout).
`python -m bench.images` prints the table; `measure_images()` returns records
{impl, workload, metric, value, unit, rep} like bench.startup.
"""
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import click

UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")
CACHE = "/var/tmp/unionfs-bench-images"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PODMAN_ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
TARGETS = {"pull-generated": 0.5, "pull-debootstrap": 0.5, "load-docker-archive": 0.33}


def fixture():
    sys.path.insert(0, os.path.join(CHECKOUT, "tests", "images"))
    try:
        import registry_fixture
    except ImportError:
        raise click.ClickException("bench.images needs the source checkout "
                                   "(tests/images/registry_fixture.py)") from None
    return registry_fixture


def generated_layers(files=8000, total=150 << 20, layers=4, seed=12):
    """Tars of a synthetic image: busybox, then `files` files (most a few kB,
    a few MB-sized) of half random, half zero bytes (gzip halves them)."""
    rf = fixture()
    rnd = random.Random(seed)
    big = max(1, files // 200)
    small_total = total // 3
    sizes = [max(1, int(rnd.expovariate(1 / (small_total / (files - big)))))
             for _ in range(files - big)]
    sizes += [(total - sum(sizes)) // big] * big
    rnd.shuffle(sizes)
    with open("/bin/busybox", "rb") as f:
        busybox = f.read()
    out, per = [], -(-files // layers)
    for n in range(layers):
        entries = [("dir", "bin", {}), ("file", "bin/busybox", {"data": busybox, "mode": 0o755}),
                   ("symlink", "bin/sh", {"target": "busybox"}), ("dir", "tmp", {"mode": 0o1777})
                   ] if n == 0 else []
        made = set()
        for i in range(n * per, min(files, (n + 1) * per)):
            d = f"l{n}/d{i % 97:02d}/s{i % 7}"
            for k in range(1, 4):
                parent = "/".join(d.split("/")[:k])
                if parent not in made:
                    made.add(parent)
                    entries.append(("dir", parent, {}))
            size = sizes[i]
            data = rnd.randbytes(size // 2) + bytes(size - size // 2)
            entries.append(("file", f"{d}/f{i}", {"data": data, "mode": 0o644}))
        out.append(rf.tar_entries(entries))
    return out


def debootstrap_layer(cache):
    rootfs = os.path.join(cache, "debootstrap-rootfs")
    if not os.path.isdir(os.path.join(rootfs, "usr")):
        tmp = rootfs + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", tmp], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)
        os.rename(tmp, rootfs)
    return subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", rootfs, "-cf", "-", "."],
                          check=True, capture_output=True).stdout


def prepare(cache, with_debootstrap=True, log=print):
    """The OCI layouts (built once), a docker-archive of the generated image."""
    rf = fixture()
    layout = os.path.join(cache, "oci")
    images = {"generated": generated_layers}
    if with_debootstrap and shutil.which("debootstrap"):
        images["debootstrap"] = lambda: [debootstrap_layer(cache)]
    for name, make in images.items():
        marker = os.path.join(cache, f"{name}.ready")
        if not os.path.exists(marker):
            log(f"building the {name} image (once, kept in {cache})")
            desc = rf.oci_image(layout, [(tar, "gzip") for tar in make()])
            rf.name_in_layout(layout, name, desc)
            with open(marker, "w") as f:
                json.dump(desc, f)
    archive = os.path.join(cache, "generated.docker.tar")
    if not os.path.exists(archive):
        rf.skopeo("copy", "-q", f"oci:{layout}:generated",
                  f"docker-archive:{archive}.tmp:bench/generated:1")
        os.rename(archive + ".tmp", archive)
    return layout, list(images), archive


def _time(argv, env=None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          timeout=1800)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}...: {proc.stderr.decode(errors='replace')}")
    return took


def _fresh(work, name):
    path = os.path.join(work, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def _record(records, impl, workload, metric, value, unit, rep):
    records.append({"impl": impl, "workload": workload, "metric": metric, "value": value,
                    "unit": unit, "rep": rep})


def _in_turn(rep, *contenders):
    """Run the contenders, in the opposite order every other round: each
    starts right after a tree's removal as often as the other (ext4 here
    creates files several times slower for ~30 s after a mass delete)."""
    for run in (contenders if rep % 2 == 0 else reversed(contenders)):
        run()


def _pull_round(records, rep, host, name, work):
    from unionfs.image import containers
    from unionfs.image.store import Store

    def ours():
        store = _fresh(work, "store")
        start = time.perf_counter()
        _time([UNIONFS, "pull", "-q", "--store", store, "--tls-verify=false",
               f"{host}/{name}:1"])
        s = Store.open(store)
        containers.create(s, s.resolve(f"{host}/{name}:1"), f"{host}/{name}:1")
        _record(records, "unionfs", f"pull-{name}", "time", time.perf_counter() - start, "s",
                rep)

    def peer():
        oci, bundle = _fresh(work, "oci"), _fresh(work, "bundle")
        took = _time(["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                      f"docker://{host}/{name}:1", f"oci:{oci}:1"])
        took += _time(["umoci", "unpack", "--image", f"{oci}:1", bundle])
        _record(records, "skopeo+umoci", f"pull-{name}", "time", took, "s", rep)
    _in_turn(rep, ours, peer)


def _blob_round(records, rep, host, name, work):
    import trio

    from unionfs.image import pull as pull_mod
    from unionfs.image import reference
    from unionfs.image.registry import Client
    from unionfs.image.store import Store
    from unionfs.image.transfer import fetch_layer
    store = Store.open(_fresh(work, "blobs"))
    ref = reference.parse(f"{host}/{name}:1")

    async def fetch_all():
        async with Client(ref.registry, tls_verify=False) as client:
            _, _, manifest = await pull_mod.resolve_manifest(client, ref, None)
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for desc in manifest.layers:
                    nursery.start_soon(lambda d=desc: fetch_layer(
                        client, ref.repository, store, d.digest, d.size, None, unpack=False))
            fetched = time.perf_counter() - start
            # the ceiling: the same GETs, bytes dropped as they come
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for desc in manifest.layers:
                    nursery.start_soon(drain, client, desc)
            return sum(d.size for d in manifest.layers), fetched, time.perf_counter() - start

    async def drain(client, desc):
        async with client.open_blob(ref.repository, desc.digest, desc.size) as (_, chunks):
            async for _ in chunks:
                pass
    size, took, raw = trio.run(fetch_all)
    _record(records, "unionfs", f"blobs-{name}", "throughput", size / took / 1e6, "MB/s", rep)
    _record(records, "http-only", f"blobs-{name}", "throughput", size / raw / 1e6, "MB/s", rep)


def _push_round(records, rep, host, name, work, layout):
    import trio

    from unionfs.image import push as push_mod
    from unionfs.image import reference
    from unionfs.image.store import Store
    store_dir = os.path.join(work, "store")        # the last pull round's
    source, dest = f"{host}/{name}:1", f"{host}/{name}-again:1"
    if rep == 0:
        _time([UNIONFS, "push", "-q", "--store", store_dir, "--tls-verify=false", source, dest])
    store = Store.open(store_dir)
    start = time.perf_counter()
    trio.run(lambda: push_mod.push(store, source, reference.parse(dest), tls_verify=False))
    _record(records, "unionfs", "push-again", "time", (time.perf_counter() - start) * 1e3, "ms",
            rep)
    took = _time([UNIONFS, "push", "-q", "--store", store_dir, "--tls-verify=false", source, dest])
    _record(records, "unionfs-cli", "push-again", "time", took * 1e3, "ms", rep)
    took = _time(["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false",
                  f"oci:{layout}:{name}", f"docker://{dest}"])
    _record(records, "skopeo", "push-again", "time", took * 1e3, "ms", rep)


def _load_round(records, rep, archive, work):
    def ours():
        store = _fresh(work, "load-store")
        took = _time([UNIONFS, "load", "-q", "--store", store, "-i", archive])
        _record(records, "unionfs", "load-docker-archive", "time", took, "s", rep)

    def peer():
        oci, bundle = _fresh(work, "oci"), _fresh(work, "bundle")
        took = _time(["skopeo", "--insecure-policy", "copy", "-q", f"docker-archive:{archive}",
                      f"oci:{oci}:1"])
        took += _time(["umoci", "unpack", "--image", f"{oci}:1", bundle])
        _record(records, "skopeo+umoci", "load-docker-archive", "time", took, "s", rep)
    _in_turn(rep, ours, peer)


CHANGE_SCRIPT = ("i=0; while [ $i -lt 1000 ]; do mkdir -p /changed/d$((i % 20)); "
                 "echo file $i > /changed/d$((i % 20))/f$i; i=$((i+1)); done")


def _commit_round(records, rep, archive, work, podman):
    from unionfs.image import containers
    from unionfs.image.store import Store
    store = Store.open(os.path.join(work, "load-store"))      # the last load round's
    image = store.resolve("bench/generated:1")
    c = containers.create(store, image, "bench/generated:1")
    for i in range(1000):
        d = os.path.join(c.upper, "changed", f"d{i % 20}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "w") as f:
            f.write(f"file {i}\n")
    took = _time([UNIONFS, "commit", "--store", store.root, c.id, f"bench/committed:{rep}"])
    _record(records, "unionfs", "commit-1000", "time", took, "s", rep)
    if podman:
        name = f"bench-commit-{rep}"
        subprocess.run([*podman, "rm", "-f", name], capture_output=True)
        subprocess.run([*podman, "run", "--name", name, "--network", "none", *PODMAN_ULIMITS,
                        "bench/generated:1", "sh", "-c", CHANGE_SCRIPT], check=True,
                       capture_output=True, timeout=600)
        took = _time([*podman, "commit", "-q", name, f"bench/committed:{rep}"])
        _record(records, "podman(fuse-overlayfs)", "commit-1000", "time", took, "s", rep)
        subprocess.run([*podman, "rm", "-f", name], capture_output=True)


def _podman(work, archive, notes):
    if not (shutil.which("podman") and shutil.which("fuse-overlayfs") and shutil.which("runc")):
        notes["podman(fuse-overlayfs)"] = "skipped: needs podman, fuse-overlayfs and runc"
        return None
    p = os.path.join(work, "podman")
    podman = ["podman", "--root", f"{p}/root", "--runroot", f"{p}/run",
              "--storage-driver", "overlay",
              "--storage-opt", "overlay.mount_program=/usr/bin/fuse-overlayfs",
              "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc"]
    proc = subprocess.run([*podman, "load", "-q", "-i", archive], capture_output=True, text=True)
    if proc.returncode != 0:
        notes["podman(fuse-overlayfs)"] = f"skipped: podman load failed: {proc.stderr.strip()}"
        return None
    return podman


def measure_images(reps=3, cache=CACHE, notes=None, with_debootstrap=True, log=print):
    """Every workload `reps` times, interleaved; the list of records."""
    rf = fixture()
    notes = {} if notes is None else notes
    os.makedirs(cache, exist_ok=True)
    layout, names, archive = prepare(cache, with_debootstrap, log)
    work = tempfile.mkdtemp(prefix="unionfs-bench-images-", dir="/var/tmp")
    records = []
    podman = None
    try:
        with rf.Registry(os.path.join(work, "registry")) as reg:
            for name in names:
                rf.skopeo_push(layout, name, f"{reg.host}/{name}:1")
            podman = _podman(work, archive, notes)
            for rep in range(reps):
                for name in names:
                    log(f"round {rep + 1}/{reps}: pull {name}")
                    _pull_round(records, rep, reg.host, name, work)
                    _blob_round(records, rep, reg.host, name, work)
                log(f"round {rep + 1}/{reps}: push again, load, commit")
                _push_round(records, rep, reg.host, names[-1], work, layout)
                _load_round(records, rep, archive, work)
                _commit_round(records, rep, archive, work, podman)
    finally:
        if podman:
            subprocess.run([*podman, "system", "reset", "-f"], capture_output=True)
        subprocess.run(["umount", "-R", "-l", os.path.join(work, "podman")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return records


PEERS = {"pull-generated": "skopeo+umoci", "pull-debootstrap": "skopeo+umoci",
         "load-docker-archive": "skopeo+umoci", "commit-1000": "podman(fuse-overlayfs)",
         "push-again": "skopeo", "blobs-generated": "http-only", "blobs-debootstrap": "http-only"}


def format_table(records):
    groups = {}
    for r in records:
        groups.setdefault((r["workload"], r["impl"], r["unit"]), []).append(r["value"])
    med = {k: statistics.median(v) for k, v in groups.items()}
    lines = [f"{'workload':<22} {'impl':<24} {'median':>10} {'unit':<5} {'n':>3}  ratio"]
    for (workload, impl, unit), value in med.items():
        peer = PEERS.get(workload)
        ref = med.get((workload, peer, unit)) if peer and impl != peer else None
        ratio = f"{value / ref:.2f}x {peer}" if ref else ""
        target = TARGETS.get(workload)
        if ref and target and impl == "unionfs":
            ratio += f" (target <= {target}x: {'met' if value / ref <= target else 'missed'})"
        lines.append(f"{workload:<22} {impl:<24} {value:>10.3f} {unit:<5} "
                     f"{len(groups[(workload, impl, unit)]):>3}  {ratio}")
    return "\n".join(lines)


@click.command()
@click.option("--reps", default=3, show_default=True, help="Rounds (median reported).")
@click.option("--cache", default=CACHE, show_default=True, type=click.Path(file_okay=False),
              help="Where the images and the debootstrap rootfs are kept between runs.")
@click.option("--no-debootstrap", is_flag=True, help="Only the generated image.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines too.")
def main(reps, cache, no_debootstrap, as_json):
    """Time pull, push, load and commit against skopeo, umoci and podman."""
    notes = {}
    records = measure_images(reps, cache, notes, not no_debootstrap,
                             log=lambda m: click.echo(m, err=True))
    click.echo(format_table(records))
    for impl, note in notes.items():
        click.echo(f"{impl}: {note}")
    if as_json:
        for record in records:
            click.echo(json.dumps(record))


if __name__ == "__main__":
    main()
