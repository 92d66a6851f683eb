#!/usr/bin/env bash
# CSI driver latencies through the gRPC socket: CreateVolume (1 TiB qcow2),
# DeleteVolume, NodeStageVolume+NodePublishVolume (1 GiB, ext4, fuse attach),
# N operations each (default 200), p50/p99 in milliseconds. For scale, the
# same run times `qemu-img create -f qcow2 IMG 1T` (a whole process each, so
# an upper bound for qemu's create itself). Needs root (loop devices, mounts).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-200}
printf '%-34s %6s %10s %10s\n' operation ops p50-ms p99-ms
go test -run '^$' -bench 'CreateVolume1TiB|DeleteVolume|NodeStagePublish' -benchtime="${N}x" ./pkg/driver/ 2>/dev/null |
  awk '/^Benchmark/ {
    name=$1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
    p50=""; p99=""
    for (i = 1; i <= NF; i++) {
      if ($(i) == "p50-ms") p50 = $(i-1)
      if ($(i) == "p99-ms") p99 = $(i-1)
    }
    printf "%-34s %6s %10s %10s\n", "driver " name, $2, p50, p99
  }'
if command -v qemu-img >/dev/null; then
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  for i in $(seq "$N"); do
    s=$(date +%s%N)
    qemu-img create -q -f qcow2 "$dir/img" 1T
    e=$(date +%s%N)
    rm -f "$dir/img"
    echo $(( (e - s) / 1000 ))
  done | sort -n | awk -v n="$N" '{ v[NR] = $1 } END {
    printf "%-34s %6d %10.3f %10.3f\n", "qemu-img create 1T (process)", n, v[int(0.5*(n-1))+1]/1000, v[int(0.99*(n-1))+1]/1000 }'
fi
