#!/usr/bin/env bash
# Installs what the build and the tests need. As root on Debian it installs the
# missing packages with apt-get; otherwise it lists what to install and fails
# only under CI=true. Go modules are downloaded into the Go module cache.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use as peers or tools. Add to this list, do not
# install elsewhere.
pkgs=(
  qemu-utils        # qemu-img, qemu-io, qemu-nbd: the qcow2 and NBD oracle
  libnbd-bin        # nbdinfo, nbdcopy, nbdsh
  fio               # benchmarks and verify workloads (nbd ioengine)
  e2fsprogs         # mkfs.ext4, resize2fs
  xfsprogs          # mkfs.xfs, xfs_growfs
)
if [ -n "${QCOW2_CSI_EXTRA_PKGS:-}" ]; then pkgs+=(${QCOW2_CSI_EXTRA_PKGS}); fi
if [ -f hack/deps.d/packages ]; then
  while read -r p _; do [ -n "$p" ] && [ "${p#\#}" = "$p" ] && pkgs+=("$p"); done < hack/deps.d/packages
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
is_root_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
# Under CI the package lists may be stale or absent, and tests/vm fetches
# Debian's current kernel package with apt-get download: refresh them once.
if [ "${CI:-}" = true ] && is_root_apt; then
  apt-get update -qq >/dev/null
fi
if [ ${#missing[@]} -gt 0 ]; then
  if is_root_apt; then
    echo "deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Update the package lists only when an install fails without it.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
      apt-get update -qq >/dev/null
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    }
  else
    echo "deps: missing Debian packages: ${missing[*]}" >&2
    echo "deps: run as root: apt-get install -y ${missing[*]}" >&2
    [ "${CI:-}" = true ] && exit 1
  fi
fi

go mod download
