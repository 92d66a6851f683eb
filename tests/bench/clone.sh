#!/usr/bin/env bash
# Clone and restore benchmarks for cloneMode (issue 17), every row of one
# section measured in the same run.
#
# ROWS selects the sections (default: both):
#
#  restore  a new image from one snapshot of a fully written RESTORE_SIZE
#           image (64 KiB clusters; 64 MiB rewritten after the snapshot) by
#           the three clone modes, on an ext4 and an xfs (reflink=1) file
#           system, each on a loop device over a sparse file in LOOP_DIR:
#           tests/bench/restore -mode overlay|reflink|copy, a whole process
#           each, every timing ending with `sync` of the output. The overlay
#           rows: "first" freezes the snapshot into the base (done once per
#           snapshot, then shared by every clone of it) and makes the
#           overlay; "overlay" is every later clone. ms, min/p50 of REPS (of
#           COPY_REPS for copy, which writes RESTORE_SIZE each time). The
#           anchor row times qemu-img create -b over the same base: an
#           empty overlay by qemu's tool, a whole process as ours is.
#  randread 4k random reads at QD32 through `qcow2-csi nbd` (fio's nbd
#           engine, unix socket) from a clone and from a flat image with
#           the same data: the clone is an empty overlay over a fully
#           written FIO_SIZE base (every read goes through the overlay's
#           lookup to the base), the flat image is the base itself. The
#           two alternate REPEAT times, RUNTIME seconds a run; best run of
#           each, and their ratio (the order alternates between runs).
#
# Needs root (loop devices, mounts), qemu-img, qemu-io, mkfs.ext4,
# mkfs.xfs, fio. The machine is shared: compare within one run only; run it
# under flock /work/logs/bench.lock.
#
# Usage: tests/bench/clone.sh
#        ROWS=restore RESTORE_SIZE=8G REPS=5 COPY_REPS=3 LOOP_DIR=/var/tmp tests/bench/clone.sh
#        ROWS=randread FIO_SIZE=1G RUNTIME=5 REPEAT=3 tests/bench/clone.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib/timing.sh

ROWS=${ROWS:-restore randread}
RESTORE_SIZE=${RESTORE_SIZE:-8G}
REPS=${REPS:-5}
COPY_REPS=${COPY_REPS:-3}
LOOP_DIR=${LOOP_DIR:-/var/tmp}
FIO_SIZE=${FIO_SIZE:-1G}
RUNTIME=${RUNTIME:-5}
REPEAT=${REPEAT:-3}

has() { case " $ROWS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
need() {
  for p in "$@"; do
    command -v "$p" >/dev/null || { echo "clone.sh: $p is missing (run hack/deps.sh as root)" >&2; exit 1; }
  done
}
need go qemu-img qemu-io
has restore && need mkfs.ext4 mkfs.xfs losetup numfmt
has randread && need fio
if has restore && [ "$(id -u)" != 0 ]; then
  echo "clone.sh: the restore section needs root (loop devices, mounts)" >&2
  exit 1
fi

work=$(mktemp -d)
mounts=()
loops=()
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
  for f in "${loops[@]}"; do rm -f "$f"; done
  rm -rf "$work"
}
trap cleanup EXIT
go build -o "$work/restore" ./tests/bench/restore
go build -o "$work/qcow2-csi" ./cmd/qcow2-csi

# fill IMAGE BYTES: write every byte, in 256 MiB requests.
fill() {
  local cmds=() o
  for ((o = 0; o < $2; o += 256 << 20)); do
    cmds+=(-c "write -P $(((o >> 28) % 250 + 1)) $o $(($2 - o < 256 << 20 ? $2 - o : 256 << 20))")
  done
  qemu-io -f qcow2 "${cmds[@]}" "$1" >/dev/null
}

if has restore; then
  bytes=$(numfmt --from=iec "$RESTORE_SIZE")
  # rep N OUT CMD...: N timed runs (OUT removed after each), "min/p50".
  rep() {
    local n=$1 out=$2 i
    shift 2
    for i in $(seq "$n"); do
      rm -f "$out"
      time_ms "$out" "$@"
    done | min_p50
  }
  row() { printf "%-6s %-48s %12s\n" "$@"; }

  echo "== restore of one snapshot of a fully written $RESTORE_SIZE image (64 KiB clusters), ms (min/p50; $REPS runs, $COPY_REPS for copy; sync included)"
  row "fs" "method" "ms"
  for fs in ext4 xfs; do
    img=$(mktemp "$LOOP_DIR/clone-$fs.XXXXXX")
    loops+=("$img")
    truncate -s $((2 * bytes + (2 << 30))) "$img"
    if [ "$fs" = xfs ]; then mkfs.xfs -q -m reflink=1 "$img"; else mkfs.ext4 -q -F "$img"; fi
    mnt=$work/$fs
    mkdir "$mnt"
    mount -o loop "$img" "$mnt"
    mounts+=("$mnt")
    src=$mnt/src.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=64k "$src" "$RESTORE_SIZE"
    fill "$src" "$bytes"
    qemu-img snapshot -c S "$src"
    qemu-io -f qcow2 -c "write -P 255 $((bytes / 3 >> 16 << 16)) 64M" "$src" >/dev/null
    sync -f "$mnt"
    o=$mnt/out.qcow2
    base=$mnt/base.qcow2
    how=$("$work/restore" -mode overlay -base "$base" "$src" S "$o")
    rm -f "$o" "$base"
    row "$fs" "overlay, first: base made ($how)" "$(rep 1 "$base" "$work/restore" -mode overlay -base "$base" "$src" S "$o")"
    rm -f "$o"
    [ -f "$base" ] || "$work/restore" -mode overlay -base "$base" "$src" S "$o" >/dev/null
    row "$fs" "overlay (base exists)" "$(rep "$REPS" "$o" "$work/restore" -mode overlay -base "$base" "$src" S "$o")"
    rm -f "$o"
    row "$fs" "anchor: qemu-img create -b base (an empty overlay)" "$(rep "$REPS" "$o" qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$o")"
    rm -f "$o"
    "$work/restore" -mode overlay -base "$base" "$src" S "$o" >/dev/null
    q=$mnt/qemu.raw
    qemu-img compare -q "$o" "$base" || { echo "clone.sh: the overlay differs from its base" >&2; exit 1; }
    qemu-img check -q "$o" || { echo "clone.sh: the overlay does not check clean" >&2; exit 1; }
    rm -f "$o" "$base"
    m=$("$work/restore" -mode reflink "$src" S "$o")
    rm -f "$o"
    if [ "$m" = reflink ]; then
      row "$fs" "reflink" "$(rep "$REPS" "$o" "$work/restore" -mode reflink "$src" S "$o")"
    else
      row "$fs" "reflink" "unsupported"
    fi
    rm -f "$o"
    row "$fs" "copy" "$(rep "$COPY_REPS" "$o" "$work/restore" -mode copy "$src" S "$o")"
    rm -f "$o" "$q"
    umount "$mnt"
    mounts=("${mounts[@]:0:${#mounts[@]}-1}")
    rm -f "$img"
  done
  echo "(each overlay compared equal to its base with qemu-img compare and checked clean, outside the timings)"
  echo
fi

if has randread; then
  fbytes=$(numfmt --from=iec "$FIO_SIZE")
  base=$work/base.qcow2
  clone=$work/clone.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=64k "$base" "$FIO_SIZE"
  fill "$base" "$fbytes"
  qemu-img create -q -f qcow2 -o cluster_size=64k -b base.qcow2 -F qcow2 "$clone" "$FIO_SIZE"
  serve() { # serve IMAGE SOCKET (read-only: the base of a clone is not written)
    rm -f "$2"
    "$work/qcow2-csi" nbd -t -r -f qcow2 -k "$2" "$1" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$2" ] && return 0; sleep 0.05; done
    echo "clone.sh: nbd server did not start" >&2; exit 1
  }
  unserve() { local p=${pids[-1]}; kill "$p"; wait "$p" 2>/dev/null || true; unset 'pids[-1]'; }
  randread() {
    fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw=randread --bs=4k --iodepth=32 \
      --size="$FIO_SIZE" --runtime="$RUNTIME" --time_based --norandommap --randrepeat=0 \
      --output-format=terse --terse-version=3 2>/dev/null | awk -F';' 'NF > 100 { print $8 }'
  }
  declare -A best=([flat]=0 [clone]=0)
  order=(flat clone)
  for _ in $(seq "$REPEAT"); do
    # Alternate who goes first, so neither always meets the warmer cache.
    order=("${order[1]}" "${order[0]}")
    for kind in "${order[@]}"; do
      img=$base
      [ "$kind" = clone ] && img=$clone
      serve "$img" "$work/$kind.sock"
      r=$(randread "$work/$kind.sock")
      unserve
      if [ "${r:-0}" -gt "${best[$kind]}" ]; then best[$kind]=$r; fi
    done
  done
  echo "== 4k randread QD32, fio nbd engine over qcow2-csi nbd, $FIO_SIZE fully written, best of $REPEAT runs of ${RUNTIME}s"
  printf '%-34s %10s\n' "image" "IOPS"
  printf '%-34s %10s\n' "flat (the base itself)" "${best[flat]}"
  printf '%-34s %10s\n' "clone (empty overlay over the base)" "${best[clone]}"
  awk -v a="${best[clone]}" -v b="${best[flat]}" 'BEGIN { if (b > 0) printf "%-34s %9.2fx\n", "clone/flat", a/b }'
fi
