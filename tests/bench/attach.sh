#!/usr/bin/env bash
# Attach backend benchmark: fio through the block device of the fuse backend
# (`qcow2-csi attach --backend=fuse`: FUSE file + loop device) against the
# floor, a plain loop device on a raw file, in the same run. The images are
# raw files, fully allocated, on the same file system.
#
# The floor is a buffered loop device: the fuse backend's file backend reads
# and writes its image through the page cache too, so both columns cache the
# same way. A loop device with direct I/O to the raw file (no page cache, every
# request reaches the disk) is shown as well, for scale.
# With FORMAT=qcow2 (or when this build attaches qcow2), a third column
# attaches a fully allocated 64k-cluster qcow2 image through the fuse backend.
# When this build has --fuse-passthrough (and PASSTHROUGH is not 0), a column
# fusept attaches a raw file with FUSE passthrough (the kernel reads and
# writes the file itself; the loop device is then buffered), for comparison:
# it is not the default.
# When this build has --fuse-cache (and CACHE is not 0), columns fusewt and
# fusewb attach a raw file with --fuse-cache=writethrough and =writeback
# (the kernel keeps a page cache of the FUSE file; the loop device is then
# buffered), and qcow2wt and qcow2wb the qcow2 image the same ways. Their FUSE
# files are read once after the attach, as the floor's raw file is by
# make_image, so that every column starts with its data in a page cache.
#
# LIBFUSE=1 adds a column libfuse: a C libfuse daemon (bindfs
# --multithreaded -o direct_io, Debian's bindfs) serving a raw file, with a
# direct-I/O loop device on it, as the fuse column's own is: the same FUSE
# round trip per request, served by libfuse instead of this project's
# daemon. It tells what is the daemon's cost and what is FUSE's.
#
# URING=1 adds columns fuseur and fusewbur: a raw file attached with
# --fuse-uring (FUSE over io_uring; needs fuse.enable_uring=Y, which the
# script does not set), without a cache and with --fuse-cache=writeback
# (with which the plugin lifts the FUSE device's dirty limit), and, when the
# qcow2 column is on, qcow2wbur: the same writeback setup on the qcow2 image.
# ONLY=1 keeps the floor and these columns.
#
# QOS=1 measures what per-volume I/O limits (docs/qos.md) cost instead: the
# same qcow2 image attached by three builds of this tree: "nothrottle" (built
# with -tags nothrottle: no throttle compiled in, the baseline), "unlimited"
# (the product: every device passes a throttle without limits, as an
# unlimited volume does) and "limited" (limits set far above what the
# machine does, so that every request takes the limits' path and never
# waits). Target: unlimited within 2% of nothrottle on every row.
#
# Rows: psync (one request at a time) and libaio (queue depth 32 for 4k, 8 for
# 1M), 4k random and 1M sequential, read and write, O_DIRECT on the device.
# Each row runs the devices alternately REPEAT times (RUNTIME seconds a run)
# and keeps each one's best run, so that a burst of load from elsewhere on a
# shared machine does not decide a row.
#
# Usage (root): tests/bench/attach.sh
#               SIZE=1G RUNTIME=3 REPEAT=2 tests/bench/attach.sh
#               CACHE=0 PASSTHROUGH=0 tests/bench/attach.sh   (fewer columns)
#               LIBFUSE=1 CACHE=0 PASSTHROUGH=0 tests/bench/attach.sh
#               QOS=1 REPEAT=3 tests/bench/attach.sh
# Keep RUNTIME short: the machines are shared.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNTIME=${RUNTIME:-3}
REPEAT=${REPEAT:-2}
SIZE=${SIZE:-1G}
[ "$(id -u)" = 0 ] || { echo "attach.sh: needs root (loop devices, FUSE mounts)" >&2; exit 1; }
for p in fio losetup qemu-img qemu-io; do
  command -v "$p" >/dev/null || { echo "attach.sh: $p is missing (run hack/deps.sh)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
loops=()
mounts=()
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/qcow2-csi" ./cmd/qcow2-csi
BIN=$work/qcow2-csi

make_image() { # make_image PATH FORMAT: fully allocated, and in the page cache
  qemu-img create -q -f "$2" ${3:+-o "$3"} "$1" "$SIZE"
  qemu-io -f "$2" -c "write -P 0x5a 0 $SIZE" "$1" >/dev/null
  cat "$1" >/dev/null
}

attach_fuse() { # attach_fuse NAME IMAGE FORMAT [BINARY [ARGS...]]: sets dev[NAME]
  local out=$work/attach.$1 bin=${4:-$BIN}
  # A Dir per process: the backend's Dir is one process's.
  "$bin" attach --backend=fuse --fuse-dir="$work/fusedir.$1" -f "$3" "${@:5}" "$2" >"$out" 2>"$out.log" &
  pids+=($!)
  for _ in $(seq 200); do
    if [ -s "$out" ]; then dev[$1]=$(head -1 "$out"); return 0; fi
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.05
  done
  cat "$out.log" >&2
  echo "attach.sh: qcow2-csi attach -f $3 $2 did not attach" >&2; exit 1
}

# run_fio DEV ENGINE RW BS QD -> "IOPS MiB/s"
run_fio() {
  fio --name=b --filename="$1" --direct=1 --ioengine="$2" --rw="$3" --bs="$4" --iodepth="$5" \
    --size="$SIZE" --runtime="$RUNTIME" --time_based --norandommap --randrepeat=0 \
    --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' 'NF > 100 { if ($7 > 0) printf "%d %.1f\n", $8, $7/1024; else printf "%d %.1f\n", $49, $48/1024 }'
}

declare -A dev=()
if [ "${QOS:-0}" = 1 ]; then
  go build -tags nothrottle -o "$work/qcow2-csi-nothrottle" ./cmd/qcow2-csi
  big=1000000000000 # far above any device: the limits' path, never a wait
  for d in nothrottle unlimited limited; do make_image "$work/$d.qcow2" qcow2 cluster_size=64k; done
  attach_fuse nothrottle "$work/nothrottle.qcow2" qcow2 "$work/qcow2-csi-nothrottle"
  attach_fuse unlimited "$work/unlimited.qcow2" qcow2
  attach_fuse limited "$work/limited.qcow2" qcow2 "$BIN" \
    --limits="readIOPS=$big,writeIOPS=$big,readBytesPerSecond=$big,writeBytesPerSecond=$big"
  devs=(nothrottle unlimited limited)
  base=nothrottle
  compared=(unlimited limited)
  echo "size=$SIZE, best of $REPEAT runs of ${RUNTIME}s per device and row, fio O_DIRECT on the block device"
  echo "one 64k-cluster qcow2 image each, qcow2-csi attach --backend=fuse built: nothrottle: with -tags nothrottle (${dev[nothrottle]}); unlimited: as shipped, no limits (${dev[unlimited]}); limited: as shipped, limits of $big per second (${dev[limited]})"
else
devs=(floor fuse)
base=floor
compared=(fuse)
make_image "$work/floor.raw" raw
make_image "$work/loopdio.raw" raw
make_image "$work/fuse.raw" raw
floor=$(losetup --direct-io=off --show -f "$work/floor.raw")
loops+=("$floor")
loopdio=$(losetup --direct-io=on --show -f "$work/loopdio.raw")
loops+=("$loopdio")
dev[floor]=$floor
dev[loopdio]=$loopdio
attach_fuse fuse "$work/fuse.raw" raw

if [ "${FORMAT:-}" = qcow2 ] || { [ -z "${FORMAT:-}" ] && "$BIN" attach --help | grep -q 'format: raw or qcow2'; }; then
  make_image "$work/fuse.qcow2" qcow2 cluster_size=64k
  attach_fuse qcow2 "$work/fuse.qcow2" qcow2
  devs+=(qcow2)
  compared+=(qcow2)
fi
if [ "${CACHE:-1}" != 0 ] && "$BIN" attach --help | grep -q -- '--fuse-cache'; then
  for m in wt:writethrough wb:writeback; do
    make_image "$work/fuse${m%%:*}.raw" raw
    attach_fuse "fuse${m%%:*}" "$work/fuse${m%%:*}.raw" raw "$BIN" --fuse-cache="${m#*:}"
    devs+=("fuse${m%%:*}")
    compared+=("fuse${m%%:*}")
    if [ -n "${dev[qcow2]:-}" ]; then
      make_image "$work/qcow2${m%%:*}.qcow2" qcow2 cluster_size=64k
      attach_fuse "qcow2${m%%:*}" "$work/qcow2${m%%:*}.qcow2" qcow2 "$BIN" --fuse-cache="${m#*:}"
      devs+=("qcow2${m%%:*}")
      compared+=("qcow2${m%%:*}")
    fi
  done
  for d in fusewt fusewb qcow2wt qcow2wb; do
    [ -n "${dev[$d]:-}" ] || continue
    cat "$(cat "/sys/block/${dev[$d]#/dev/}/loop/backing_file")" >/dev/null
  done
fi
if [ "${PASSTHROUGH:-1}" != 0 ] && "$BIN" attach --help | grep -q -- '--fuse-passthrough'; then
  make_image "$work/fusept.raw" raw
  attach_fuse fusept "$work/fusept.raw" raw "$BIN" --fuse-passthrough
  devs+=(fusept)
  compared+=(fusept)
fi
if [ "${URING:-0}" = 1 ]; then
  [ "$(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null)" = Y ] ||
    { echo "attach.sh: URING=1 needs FUSE over io_uring on (echo Y > /sys/module/fuse/parameters/enable_uring)" >&2; exit 1; }
  for m in ur:none wbur:writeback; do
    make_image "$work/fuse${m%%:*}.raw" raw
    attach_fuse "fuse${m%%:*}" "$work/fuse${m%%:*}.raw" raw "$BIN" --fuse-cache="${m#*:}" --fuse-uring -v
    grep -q "serving over io_uring" "$work/attach.fuse${m%%:*}.log" ||
      { cat "$work/attach.fuse${m%%:*}.log" >&2; echo "attach.sh: fuse${m%%:*} is not served over io_uring" >&2; exit 1; }
    devs+=("fuse${m%%:*}")
    compared+=("fuse${m%%:*}")
  done
  ur=(fuseur fusewbur)
  if [ -n "${dev[qcow2]:-}" ]; then
    make_image "$work/qcow2wbur.qcow2" qcow2 cluster_size=64k
    attach_fuse qcow2wbur "$work/qcow2wbur.qcow2" qcow2 "$BIN" --fuse-cache=writeback --fuse-uring -v
    grep -q "serving over io_uring" "$work/attach.qcow2wbur.log" ||
      { cat "$work/attach.qcow2wbur.log" >&2; echo "attach.sh: qcow2wbur is not served over io_uring" >&2; exit 1; }
    devs+=(qcow2wbur)
    compared+=(qcow2wbur)
    ur+=(qcow2wbur)
  fi
  for d in fusewbur qcow2wbur; do
    [ -n "${dev[$d]:-}" ] || continue
    backing=$(cat "/sys/block/${dev[$d]#/dev/}/loop/backing_file")
    cat "$backing" >/dev/null
    bdi=/sys/class/bdi/$(stat -c '%Hd:%Ld' "$backing")
    [ "$(cat "$bdi/strict_limit")" = 0 ] || { echo "attach.sh: $d's dirty limit was not lifted ($bdi)" >&2; exit 1; }
  done
  if [ "${ONLY:-0}" = 1 ]; then
    devs=(floor "${ur[@]}")
    compared=("${ur[@]}")
  fi
fi
if [ "${LIBFUSE:-0}" = 1 ]; then
  command -v bindfs >/dev/null || { echo "attach.sh: LIBFUSE=1 needs bindfs (hack/deps.sh installs it)" >&2; exit 1; }
  mkdir "$work/libfuse.src" "$work/libfuse.mnt"
  make_image "$work/libfuse.src/libfuse.raw" raw
  bindfs --multithreaded -o direct_io "$work/libfuse.src" "$work/libfuse.mnt"
  mounts+=("$work/libfuse.mnt")
  dev[libfuse]=$(losetup --direct-io=on --show -f "$work/libfuse.mnt/libfuse.raw")
  loops+=("${dev[libfuse]}")
  devs+=(libfuse)
  compared+=(libfuse)
fi
[ "${ONLY:-0}" = 1 ] || devs+=(loopdio)

echo "size=$SIZE, best of $REPEAT runs of ${RUNTIME}s per device and row, fio O_DIRECT on the block device"
echo "floor: loop device on a raw file ($floor); fuse: qcow2-csi attach --backend=fuse on a raw file (${dev[fuse]})${dev[qcow2]:+; qcow2: the same on a qcow2 image (${dev[qcow2]})}${dev[fusept]:+; fusept: the same on a raw file with --fuse-passthrough (${dev[fusept]})}${dev[fusewt]:+; fusewt, fusewb: the same on a raw file with --fuse-cache=writethrough, =writeback (${dev[fusewt]}, ${dev[fusewb]})}${dev[qcow2wt]:+; qcow2wt, qcow2wb: the same on a qcow2 image (${dev[qcow2wt]}, ${dev[qcow2wb]})}${dev[fuseur]:+; fuseur, fusewbur: the same on a raw file with --fuse-uring, without a cache and with --fuse-cache=writeback (${dev[fuseur]}, ${dev[fusewbur]})}${dev[qcow2wbur]:+; qcow2wbur: the writeback one on a qcow2 image (${dev[qcow2wbur]})}${dev[libfuse]:+; libfuse: bindfs (C libfuse $(bindfs --fuse-version 2>/dev/null | sed -n 's/.*linked version //p'), -o direct_io) on a raw file, loop device with direct I/O (${dev[libfuse]})}; loopdio: loop device with direct I/O on a raw file ($loopdio)"
fi
hdr=$(printf '%-7s %-10s %-3s %-3s' engine rw bs qd)
for d in "${devs[@]}"; do hdr+=$(printf ' | %9s %8s' "$d IOPS" "MiB/s"); done
for d in "${compared[@]}"; do hdr+=$(printf ' | %11s' "$d/$base"); done
echo "$hdr"

rows=("psync randread 4k 1" "psync randwrite 4k 1" "libaio randread 4k 32" "libaio randwrite 4k 32"
      "psync read 1M 1" "psync write 1M 1" "libaio read 1M 8" "libaio write 1M 8")
for row in "${rows[@]}"; do
  set -- $row
  declare -A res=()
  for d in "${devs[@]}"; do res[$d]="0 0"; done
  for _ in $(seq "$REPEAT"); do
    for d in "${devs[@]}"; do
      r=$(run_fio "${dev[$d]}" "$1" "$2" "$3" "$4")
      read -r best _ <<<"${res[$d]}"
      read -r iops _ <<<"$r"
      if [ "${iops:-0}" -gt "$best" ]; then res[$d]=$r; fi
    done
  done
  line=$(printf '%-7s %-10s %-3s %-3s' "$1" "$2" "$3" "$4")
  for d in "${devs[@]}"; do read -r i b <<<"${res[$d]}"; line+=$(printf ' | %9s %8s' "$i" "$b"); done
  read -r bi _ <<<"${res[$base]}"
  for d in "${compared[@]}"; do
    read -r ci _ <<<"${res[$d]}"
    line+=$(printf ' | %11s' "$(awk -v a="$ci" -v b="$bi" 'BEGIN { if (b > 0) printf "%.3fx", a/b; else print "-" }')")
  done
  echo "$line"
  unset res
done
