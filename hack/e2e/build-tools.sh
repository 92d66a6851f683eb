#!/usr/bin/env bash
# build-tools.sh: builds the Kubernetes and CSI side programs the e2e suite runs
# (control plane, kubelet, kubectl, etcd, CSI sidecars, snapshot-controller,
# helm, csi-sanity) from the Go module proxy, all in ONE wrapper module
# (hack/e2e/tools) so the shared k8s.io libraries compile once.
#
# Output: $QCOW2_CSI_CACHE/e2e/tools-<key>/bin, where <key> hashes the wrapper
# go.mod/go.sum, this script and the Go version: a warm run only checks the
# stamp and prints the directory. The last line of stdout is the bin directory.
#
#   hack/e2e/build-tools.sh           build (or reuse) the binaries
#   hack/e2e/build-tools.sh -regen    re-resolve hack/e2e/tools/go.mod from the
#                                     versions below (needs the proxy)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
SELF=$ROOT/hack/e2e/build-tools.sh
W=$ROOT/hack/e2e/tools

# Versions that build together (see HARNESS.md): k8s 1.36.3 with its staging
# modules at v0.36.3, etcd 3.6.16, the sidecars whose go.mod asks for
# k8s.io/* <= 0.36 and CSI spec <= 1.12.
KV=1.36.3 EV=3.6.16 SNAP=v8.6.0 RES=v2.2.0 PROV=v6.3.0 CSITEST=v5.4.0 HELM=v3.21.4
# external-snapshot-metadata: `go install ...@v0.2.0` refuses it (its go.mod
# replaces its client module with ./client), so it joins this module by
# `go get`, which adds its requirements (client v0.1.0) without moving ours.
# pkg/iterator is a library: listed so the module keeps it for test clients.
SMD=v0.2.0
TOOLS=(
  "k8s.io/kubernetes@v$KV:cmd/kube-apiserver,cmd/kube-controller-manager,cmd/kube-scheduler,cmd/kubelet,cmd/kubectl"
  "go.etcd.io/etcd/server/v3@v$EV:."
  "github.com/kubernetes-csi/external-snapshotter/v8@$SNAP:cmd/snapshot-controller,cmd/csi-snapshotter"
  "github.com/kubernetes-csi/external-resizer/v2@$RES:cmd/csi-resizer"
  "github.com/kubernetes-csi/external-provisioner/v6@$PROV:cmd/csi-provisioner"
  "github.com/kubernetes-csi/csi-test/v5@$CSITEST:cmd/csi-sanity"
  "helm.sh/helm/v3@$HELM:cmd/helm"
  "github.com/kubernetes-csi/external-snapshot-metadata@$SMD:cmd/csi-snapshot-metadata,examples/snapshot-metadata-lister,examples/snapshot-metadata-verifier,pkg/iterator"
)
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local CGO_ENABLED=0

pkgs() { # prints module/path@version for every main package
  for t in "${TOOLS[@]}"; do
    mv=${t%%:*}; mod=${mv%@*}; ver=${mv#*@}
    for c in $(echo "${t#*:}" | tr , ' '); do
      if [ "$c" = . ]; then echo "$mod@$ver"; else echo "$mod/$c@$ver"; fi
    done
  done
}

regen() {
  mkdir -p "$W/stub/sample-apiserver"
  # k8s.io/sample-apiserver is required by k8s.io/kubernetes but the proxy
  # refuses its zip; no command we build imports it, so a stub satisfies go.
  printf 'module k8s.io/sample-apiserver\n\ngo 1.24\n' > "$W/stub/sample-apiserver/go.mod"
  cd "$W"; rm -f go.mod go.sum
  go mod download "k8s.io/kubernetes@v$KV"
  local M; M=$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/v$KV.mod
  printf 'module github.com/qcow2-csi/qcow2-csi/hack/e2e/tools\n\ngo 1.26.0\n' > go.mod
  local R=() m
  # k8s.io/kubernetes replaces its staging modules with ./staging paths, which
  # do not apply to a dependency: pin each to the published v0.<minor>.<patch>.
  for m in $(sed -n '/^replace (/,/^)/p' "$M" | awk '/=>/{print $1}'); do
    case $m in
      k8s.io/sample-apiserver) R+=("-replace=$m=./stub/sample-apiserver") ;;
      k8s.io/sample-*) ;;
      *) R+=("-replace=$m=$m@v0.${KV#1.}") ;;
    esac
  done
  for m in api/v3 client/pkg/v3 client/v3 pkg/v3; do R+=("-replace=go.etcd.io/etcd/$m=go.etcd.io/etcd/$m@v$EV"); done
  R+=("-replace=github.com/kubernetes-csi/external-snapshotter/client/v8=github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAP")
  go mod edit "${R[@]}"
  go get $(pkgs)
  # tools.go keeps `go mod tidy` from dropping the commands.
  { echo '//go:build tools'; echo; echo '// Package tools pins the e2e side programs built by build-tools.sh.'
    echo 'package tools'; echo; echo 'import ('
    for p in $(pkgs); do echo "	_ \"${p%@*}\""; done; echo ')'; } > tools.go
  gofmt -w tools.go
}

if [ "${1:-}" = -regen ] || [ ! -f "$W/go.mod" ]; then regen; fi

CACHE=${QCOW2_CSI_CACHE:-$ROOT/.cache}
KEY=$( { cat "$W/go.mod" "$W/go.sum" "$SELF"; go version; } | sha256sum | cut -c1-16)
[ ${#KEY} = 16 ] || { echo "build-tools: no cache key" >&2; exit 1; }
OUT=$CACHE/e2e/tools-$KEY
# A warm run touches the stamp: its mtime says when the output was last used.
if [ -f "$OUT/stamp" ]; then touch "$OUT/stamp"; echo "$OUT/bin"; exit 0; fi
rm -rf "$OUT"; mkdir -p "$OUT/bin"
cd "$W"
MINOR=$(echo $KV | cut -d. -f2)
LD="-s -w -X k8s.io/component-base/version.gitVersion=v$KV -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/component-base/version.gitTreeState=clean -X helm.sh/helm/v3/internal/version.version=$HELM"
t0=$(date +%s)
# One go build for all main packages: the shared libraries compile once and in
# parallel; -o into a directory names each binary after its package.
go build -trimpath -ldflags="$LD" -o "$OUT/bin/" $(pkgs | sed 's/@.*//') >&2
[ -f "$OUT/bin/server" ] && mv "$OUT/bin/server" "$OUT/bin/etcd"
[ -f "$OUT/bin/v3" ] && mv "$OUT/bin/v3" "$OUT/bin/etcd"
echo "build-tools: built $(ls "$OUT/bin" | wc -l) programs in $(( $(date +%s) - t0 )) s" >&2
date -u > "$OUT/stamp"
# Outputs of other versions (or of an older build-tools.sh) are stale once
# unused for two days; sooner would pull them from under another worktree's
# checkout (a branch with an older tools module) that may be running e2e now.
for d in "$CACHE"/e2e/tools-*; do
  [ "$d" = "$OUT" ] && continue
  if [ -z "$(find "$d" -maxdepth 1 -name stamp -mmin -2880)" ] && [ -z "$(find "$d" -maxdepth 0 -mmin -2880)" ]; then rm -rf "$d"; fi
done
echo "$OUT/bin"
