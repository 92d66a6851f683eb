#!/usr/bin/env bash
# Snapshot, changed-block-tracking and restore benchmarks (issue 7), each
# with qemu's equivalent measured in the same run on the same kind of disk.
#
# ROWS selects the sections (default: all three):
#
#  metadata  GetMetadataDelta and GetMetadataAllocated on volumes of 10 GiB,
#            100 GiB and 1 TiB with 1 GiB written between two snapshots
#            (16384 runs of 64 KiB): through the driver's gRPC socket (every
#            message received), at the pkg/snapshotter level, and qemu on the
#            same image: `nbdinfo --map=qemu:dirty-bitmap:B -- [ qemu-nbd -r
#            -B B ]` for the delta, `nbdinfo --map -- [ qemu-nbd -r -l S ]` for
#            the allocation (whole processes, so they include qemu-nbd's start).
#            go test -bench SnapshotMetadata ./pkg/driver, -benchtime REPS x.
#  load      the I/O latency a snapshot every INTERVAL seconds adds to fio
#            (4k randwrite, then 4k randread, libaio QD32, RUNTIME seconds,
#            on a fully written LOAD_SIZE volume): a block volume of the driver
#            staged with the fuse attach backend, with crash-consistent bitmaps
#            (serve's default) and without (driver-nocc), against qemu-storage-daemon
#            exporting a qcow2 image over NBD (fio's nbd engine) with QMP
#            blockdev-snapshot-internal-sync. go test -bench SnapshotUnderLoad
#            ./pkg/driver. Needs root, FUSE, fio, qemu-storage-daemon (Debian
#            ships it in qemu-system-common).
#  restore   a new image from one snapshot of a fully written RESTORE_SIZE
#            image (64 KiB clusters): pkg/snapshotter.Restore by reflink on
#            xfs (reflink=1, on a loop device over a sparse file in XFS_DIR)
#            and by copy on the host file system (TMPDIR), against `cp
#            --reflink=always`, a plain `cp`, and `qemu-img convert -l
#            snapshot.name=S -O qcow2`. Every timing ends with `sync FILE` of
#            the output (cp and qemu-img convert do not fsync; Restore does).
#            The page cache is warm. Needs root for the xfs rows; up to
#            3 x RESTORE_SIZE of free space on the host file system.
#
# The machine is shared: compare columns of one run only. Figures are
# "min/median" of REPS runs unless said otherwise.
#
# Usage: tests/bench/cbt.sh
#        ROWS=metadata REPS=5 tests/bench/cbt.sh
#        ROWS=load LOAD_SIZE=2G RUNTIME=20 INTERVAL=2 tests/bench/cbt.sh
#        ROWS=restore RESTORE_SIZE=8G REPS=3 XFS_DIR=/var/tmp tests/bench/cbt.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib/timing.sh

ROWS=${ROWS:-metadata load restore}
REPS=${REPS:-3}
LOAD_SIZE=${LOAD_SIZE:-1G}
RUNTIME=${RUNTIME:-20}
INTERVAL=${INTERVAL:-2}
RESTORE_SIZE=${RESTORE_SIZE:-8G}
XFS_DIR=${XFS_DIR:-/var/tmp}

need() {
  for p in "$@"; do
    command -v "$p" >/dev/null || { echo "cbt.sh: $p is missing (run hack/deps.sh as root)" >&2; exit 1; }
  done
}
has() { case " $ROWS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

need go
has metadata && need qemu-nbd nbdinfo
has load && need fio qemu-storage-daemon qemu-img
has restore && need qemu-img qemu-io mkfs.xfs losetup numfmt
if { has load || has restore; } && [ "$(id -u)" != 0 ]; then
  echo "cbt.sh: the load and restore sections need root (FUSE, loop devices, mounts); run ROWS=metadata otherwise" >&2
  exit 1
fi

work=$(mktemp -d)
mnt=
xfsimg=
cleanup() {
  if [ -n "$mnt" ] && mountpoint -q "$mnt"; then umount "$mnt" || umount -l "$mnt"; fi
  [ -n "$xfsimg" ] && rm -f "$xfsimg"
  rm -rf "$work"
}
trap cleanup EXIT

# go test -bench output lines of the named benchmark, as "name metric value" triples.
bench() {
  go test -run '^$' -bench "$1" -benchtime "$2" -timeout 60m ./pkg/driver/ |
    awk '/^Benchmark/ { name=$1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark[^\/]*\//, "", name)
                        printf "%s ns/op %s\n", name, $3
                        for (i = 5; i < NF; i += 2) printf "%s %s %s\n", name, $(i+1), $(i) }
         /^(--- FAIL|FAIL|panic)/ { print > "/dev/stderr"; bad=1 }
         /SKIP/ { print > "/dev/stderr" }
         END { exit bad }'
}

if has metadata; then
  echo "== GetMetadataDelta / GetMetadataAllocated, 1 GiB written in 16384 runs, ms per call (mean of $REPS)"
  bench 'SnapshotMetadata' "${REPS}x" >"$work/meta"
  awk '$2 == "ns/op" { split($1, p, "/"); v[p[1], p[2]] = $3 / 1e6; if (!(p[1] in seen)) { seen[p[1]] = 1; order[++n] = p[1] } }
    END {
      printf "%-8s | %-31s | %-32s\n", "", "delta (s1..s2)", "allocated (s2)"
      printf "%-8s | %9s %11s %9s | %9s %11s %10s\n", "volume", "gRPC", "snapshotter", "qemu-nbd", "gRPC", "snapshotter", "qemu-nbd"
      for (i = 1; i <= n; i++) { s = order[i]
        printf "%-8s | %9.1f %11.1f %9.1f | %9.1f %11.1f %10.1f\n", s,
          v[s, "grpc-delta"], v[s, "snapshotter-delta"], v[s, "qemu-delta"],
          v[s, "grpc-allocated"], v[s, "snapshotter-allocated"], v[s, "qemu-allocated"] } }' "$work/meta"
  echo "(qemu-nbd: nbdinfo --map over qemu-nbd -B / -l, whole processes; every cell found the 16384 runs)"
  echo
fi

if has load; then
  bytes=$(numfmt --from=iec "$LOAD_SIZE")
  echo "== fio 4k QD32 on a fully written $LOAD_SIZE volume, ${RUNTIME}s per row, a snapshot every ${INTERVAL}s in the 'snapshots' rows"
  QCOW2_CSI_BENCH_LOAD=1 QCOW2_CSI_BENCH_LOAD_SIZE=$bytes QCOW2_CSI_BENCH_LOAD_RUNTIME=$RUNTIME QCOW2_CSI_BENCH_LOAD_INTERVAL=$INTERVAL \
    bench 'SnapshotUnderLoad' 1x >"$work/load"
  awk '{ split($1, p, "/"); k = p[1] " " p[2] " " p[3]; v[k, $2] = $3; if (!(k in seen)) { seen[k] = 1; order[++n] = k } }
    END {
      printf "%-32s %7s %8s %8s %9s %8s %6s %11s %11s\n", "side workload mode", "IOPS", "p50-us", "p99-us", "p99.9-us", "max-us", "snaps", "snap-p50-ms", "snap-max-ms"
      for (i = 1; i <= n; i++) { k = order[i]
        printf "%-32s %7.0f %8.0f %8.0f %9.0f %8.0f %6s %11s %11s\n", k, v[k, "iops"], v[k, "p50-us"], v[k, "p99-us"],
          v[k, "p99.9-us"], v[k, "max-us"], (k, "snaps") in v ? sprintf("%d", v[k, "snaps"]) : "-",
          (k, "snap-p50-ms") in v ? v[k, "snap-p50-ms"] : "-", (k, "snap-max-ms") in v ? v[k, "snap-max-ms"] : "-" } }' "$work/load"
  echo "(driver: loop + FUSE + pkg/qcow2, CreateSnapshot over gRPC, crash-consistent bitmaps on (nocc: off);"
  echo " qemu: fio nbd engine -> qemu-storage-daemon, QMP blockdev-snapshot-internal-sync."
  echo " Latency is fio's completion latency; compare idle with snapshots within a side)"
  echo
fi

if has restore; then
  bytes=$(numfmt --from=iec "$RESTORE_SIZE")
  free=$(( $(df --output=avail -k "$work" | tail -1) * 1024 ))
  if [ "$free" -lt $(( 3 * bytes + (2 << 30) )) ]; then
    echo "cbt.sh: restore needs 3 x $RESTORE_SIZE + 2 GiB free under $work, $((free >> 30)) GiB free" >&2
    exit 1
  fi
  go build -o "$work/restore" ./tests/bench/restore
  go build -o "$work/qcow2-csi" ./cmd/qcow2-csi
  row() { printf "%-12s %-52s %14s\n" "$@"; }
  # rep OUT CMD...: REPS timed runs (OUT removed after each), "min/median".
  rep() {
    local out=$1 i
    shift
    for i in $(seq "$REPS"); do
      rm -f "$out"
      time_ms "$out" "$@"
    done | min_p50
  }

  echo "== restore of one snapshot of a fully written $RESTORE_SIZE image (64 KiB clusters), ms (min/median of $REPS, sync included)"
  src=$work/src.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=64k "$src" "$RESTORE_SIZE"
  fill=()
  for ((o = 0; o < bytes; o += 256 << 20)); do fill+=(-c "write -P $(((o >> 28) % 250 + 1)) $o $((256 << 20))"); done
  qemu-io -f qcow2 "${fill[@]}" "$src" >/dev/null
  qemu-img snapshot -c S "$src"
  # The disk moves on after the snapshot: 64 MiB rewritten (copied on write).
  qemu-io -f qcow2 -c "write -P 255 $((bytes / 3 >> 16 << 16)) 64M" "$src" >/dev/null
  sync "$src"
  row "file system" "method" "ms"
  o=$work/out.qcow2
  q=$work/qemu.qcow2
  row "host fs" "qcow2-csi restore (copy of the data clusters)" "$(rep "$o" "$work/restore" -copy "$src" S "$o")"
  row "host fs" "qcow2-csi img convert -l snapshot.name=S -O qcow2" "$(rep "$o" "$work/qcow2-csi" img convert -l snapshot.name=S -O qcow2 "$src" "$o")"
  row "host fs" "qemu-img convert -l snapshot.name=S -O qcow2" "$(rep "$q" qemu-img convert -l snapshot.name=S -O qcow2 -o cluster_size=64k "$src" "$q")"
  row "host fs" "cp (the whole file, all snapshots)" "$(rep "$o" cp "$src" "$o")"
  if cp --reflink=always "$src" "$o" 2>/dev/null; then
    row "host fs" "cp --reflink=always" "$(rep "$o" cp --reflink=always "$src" "$o")"
  else
    row "host fs" "cp --reflink=always" "unsupported"
  fi
  rm -f "$o" "$q"
  "$work/restore" -copy "$src" S "$o" >/dev/null
  qemu-img convert -l snapshot.name=S -O qcow2 -o cluster_size=64k "$src" "$q"
  qemu-img compare -q "$o" "$q" || { echo "cbt.sh: the copy restore differs from qemu-img convert -l" >&2; exit 1; }
  rm -f "$o" "$q"

  # xfs with reflink on a loop device over a sparse file.
  xfsimg=$(mktemp "$XFS_DIR/cbt-xfs.XXXXXX")
  truncate -s $((3 * bytes + (1 << 30))) "$xfsimg"
  mkfs.xfs -q -m reflink=1 "$xfsimg"
  mnt=$work/xfs
  mkdir "$mnt"
  mount -o loop "$xfsimg" "$mnt"
  cp "$src" "$mnt/src.qcow2"
  rm -f "$src"
  src=$mnt/src.qcow2
  sync "$src"
  o=$mnt/out.qcow2
  q=$mnt/qemu.qcow2
  m=$("$work/restore" "$src" S "$o")
  [ "$m" = reflink ] || { echo "cbt.sh: restore on xfs took the $m path, not reflink" >&2; exit 1; }
  rm -f "$o"
  row "xfs reflink" "qcow2-csi restore (reflink, then revert to S)" "$(rep "$o" "$work/restore" "$src" S "$o")"
  row "xfs reflink" "cp --reflink=always (the whole file)" "$(rep "$o" cp --reflink=always "$src" "$o")"
  row "xfs reflink" "qemu-img convert -l snapshot.name=S -O qcow2" "$(rep "$q" qemu-img convert -l snapshot.name=S -O qcow2 -o cluster_size=64k "$src" "$q")"
  rm -f "$o" "$q"
  "$work/restore" "$src" S "$o" >/dev/null
  qemu-img convert -l snapshot.name=S -O qcow2 -o cluster_size=64k "$src" "$q"
  qemu-img compare -q "$o" "$q" || { echo "cbt.sh: the reflink restore differs from qemu-img convert -l" >&2; exit 1; }
  qemu-img check -q "$o" || { echo "cbt.sh: the reflink restore does not check clean" >&2; exit 1; }
  echo "(each restore compared equal to qemu-img convert -l snapshot.name=S once, outside the timings)"
fi
