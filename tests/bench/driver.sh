#!/usr/bin/env bash
# CSI driver latencies through the gRPC socket: CreateVolume (1 TiB),
# DeleteVolume, NodeStageVolume+NodePublishVolume (1 GiB, ext4), 200
# operations each, p50/p99 in milliseconds. Needs root (loop devices, mounts).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-200}
printf '%-28s %8s %10s %10s %12s\n' benchmark ops p50-ms p99-ms ns/op
go test -run '^$' -bench 'CreateVolume1TiB|DeleteVolume|NodeStagePublish' -benchtime="${N}x" ./pkg/driver/ 2>/dev/null |
  awk '/^Benchmark/ {
    name=$1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
    p50=""; p99=""; ns=""
    for (i = 1; i <= NF; i++) {
      if ($(i) == "p50-ms") p50 = $(i-1)
      if ($(i) == "p99-ms") p99 = $(i-1)
      if ($(i) == "ns/op") ns = $(i-1)
    }
    printf "%-28s %8s %10s %10s %12s\n", name, $2, p50, p99, ns
  }'
