#!/usr/bin/env bash
# Idempotent set-up: system packages, a venv with unionfs installed editable,
# and the console scripts linked into /usr/local/bin (mount(8) runs helpers
# through /bin/sh with a default PATH, so they must not need the venv active).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config attr git xz-utils
  fuse-overlayfs unionfs-fuse busybox-static xfsprogs
  python3-venv
  bubblewrap runc podman
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

# Prefer a real interpreter over a pyenv shim (the shim adds ~100 ms a start).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in /root/.pyenv/versions/3.11.*/bin/python3.11 /usr/bin/python3.11 /usr/bin/python3; do
    [ -x "$cand" ] && { PY=$cand; break; }
  done
fi
VENV="$here/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# compat: a plain path entry in a .pth file; the default editable mode's
# import hook costs every start of `unionfs` ~10 ms (it imports importlib.metadata)
EDITABLE=(-e ".[test,bench]" --config-settings editable_mode=compat)
stamp="$VENV/.installed-$( (cat setup.cfg pyproject.toml; echo "${EDITABLE[*]}") | sha1sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "${EDITABLE[@]}"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
# Bytecode for our own modules (an editable install gets none, and with
# PYTHONDONTWRITEBYTECODE set, as here, every start would compile them again:
# ~27 ms for a server); only stale files are rewritten.
"$VENV/bin/python" -m compileall -q "$here/unionfs" "$here/runner" "$here/bench" >/dev/null
for prog in unionfs fuse-unionfs; do
  ln -sfn "$VENV/bin/$prog" "/usr/local/bin/$prog"
done
# umount(8) runs this for fuse.unionfs mounts: it waits for the server to exit
ln -sfn "$here/scripts/umount.fuse.unionfs" /sbin/umount.fuse.unionfs
echo "setup: ready ($VENV)" >&2
