#!/usr/bin/env bash
# What the one-controller topology adds to provisioning: CreateVolume (1 GiB
# qcow2), CreateSnapshot and ControllerGetVolume (no disk write: the routing
# alone), N each (default 200), on the node's own socket
# (direct) and through serve --mode=controller and the node agent (mutual
# TLS over 127.0.0.1), alternating call by call so both paths see the same
# pool. p50/p99 in milliseconds, side by side; target: under 5 ms added at
# p50 (issue 13).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-200}
printf '%-20s %6s %12s %12s %12s %12s %12s\n' operation ops direct-p50 routed-p50 added-p50 direct-p99 routed-p99
go test -run '^$' -bench '^BenchmarkRoute$' -benchtime="${N}x" ./pkg/driver/ 2>/dev/null |
  awk '/^BenchmarkRoute\// {
    name=$1; sub(/-[0-9]+$/, "", name); sub(/^BenchmarkRoute\//, "", name)
    for (i = 1; i <= NF; i++) v[$(i)] = $(i-1)
    printf "%-20s %6s %12s %12s %12s %12s %12s\n", name, $2, v["direct-p50-ms"], v["routed-p50-ms"], v["added-p50-ms"], v["direct-p99-ms"], v["routed-p99-ms"]
  }'
