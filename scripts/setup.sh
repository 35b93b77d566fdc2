#!/usr/bin/env bash
# Idempotent set-up, as root: system packages, then unionfs installed for
# every user on this machine.
#
# The install is a venv under $UNIONFS_PREFIX (default /opt/unionfs) built on
# the system's interpreter (/usr/bin/python3.11, readable by all), holding a
# copy of this checkout (not an editable link: the checkout may sit under a
# 0700 home, and a plain user, or podman's mount program in a user namespace,
# must be able to run it). It is reinstalled whenever the sources change.
# fuse-unionfs is a small C program (client/) built here with gcc: the
# daemon's fast path, which execs the Python fuse-unionfs-py for the rest.
# `unionfs` and `fuse-unionfs` are linked into /usr/local/bin (mount(8) runs
# helpers through /bin/sh with a default PATH, so they must not need the venv
# active), and /dev/fuse is made usable by plain users, as udev does on an
# ordinary Debian machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
PREFIX=${UNIONFS_PREFIX:-/opt/unionfs}
VENV="$PREFIX/venv"

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config attr acl git xz-utils strace
  python3.11 python3.11-venv python3.11-dev gcc
  fuse-overlayfs unionfs-fuse busybox-static xfsprogs
  bubblewrap runc podman uidmap
  umoci skopeo docker-registry debootstrap rsync
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's docker-registry starts a system service we do not want running.
if [ -x /etc/init.d/docker-registry ]; then
  /etc/init.d/docker-registry stop >/dev/null 2>&1 || true
fi

PY=${PYTHON:-/usr/bin/python3.11}
if [ ! -x "$VENV/bin/pip" ] || [ ! -e "$VENV/.base" ]; then
  mkdir -p "$PREFIX"
  "$PY" -m venv --clear "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  touch "$VENV/.base"
fi
# Dependencies: once per change of the metadata.
deps_stamp="$VENV/.deps-$( (cat setup.cfg pyproject.toml) | sha1sum | cut -c1-12)"
if [ ! -e "$deps_stamp" ]; then
  "$VENV/bin/pip" install -q ".[test,bench]"
  rm -f "$VENV"/.deps-* "$VENV"/.src-*
  touch "$deps_stamp"
fi
# The package itself: once per change of the sources (pip compiles its bytecode).
src_stamp="$VENV/.src-$(find unionfs runner bench -name '*.py' -print0 | sort -z \
  | xargs -0 sha1sum | sha1sum | cut -c1-12)"
if [ ! -e "$src_stamp" ]; then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall .
  rm -rf build ./*.egg-info
  rm -f "$VENV"/.src-*
  touch "$src_stamp"
fi
# The installed fuse-unionfs is the C client (client/fuse-unionfs-client.c): it
# mounts through a daemon without starting Python, and execs the Python program
# (the console script fuse-unionfs-py) for everything else. Built once per
# change of its source (or of the prefix it names), and whenever it is missing
# (pip removes an older install's fuse-unionfs script on reinstall).
client_src=client/fuse-unionfs-client.c
client_stamp="$VENV/.client-$( (cat "$client_src"; echo "$VENV") | sha1sum | cut -c1-12)"
if [ ! -e "$client_stamp" ] || [ ! -x "$VENV/bin/fuse-unionfs" ] \
    || [ -L "$VENV/bin/fuse-unionfs" ] || head -c2 "$VENV/bin/fuse-unionfs" | grep -q '#!'; then
  gcc -std=gnu11 -O2 -Wall -Wextra -Werror -DFALLBACK="\"$VENV/bin/fuse-unionfs-py\"" \
    -o "$VENV/bin/.fuse-unionfs.new" "$client_src"
  mv -f "$VENV/bin/.fuse-unionfs.new" "$VENV/bin/fuse-unionfs"
  rm -f "$VENV"/.client-*
  touch "$client_stamp"
fi
chmod -R a+rX "$PREFIX"
# UNIONFS_LINK_BIN=0: a second install beside the main one (say, a branch
# under test) that leaves /usr/local/bin alone
if [ "${UNIONFS_LINK_BIN:-1}" != 0 ]; then
  for prog in unionfs fuse-unionfs; do
    ln -sfn "$VENV/bin/$prog" "/usr/local/bin/$prog"
  done
fi
install -D -m 0644 "$here/docs/fuse-unionfs.1" /usr/local/share/man/man1/fuse-unionfs.1
# umount(8) runs this for fuse.unionfs mounts: it waits for the server to exit
install -m 0755 "$here/scripts/umount.fuse.unionfs" /sbin/umount.fuse.unionfs
# plain users' FUSE mounts (fusermount3 is setuid; the device must be open to them)
[ -c /dev/fuse ] && chmod 0666 /dev/fuse
echo "setup: ready ($VENV)" >&2
