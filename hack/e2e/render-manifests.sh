#!/usr/bin/env bash
# render-manifests.sh [OUT]: renders charts/qcow2-csi with its default values
# into plain manifests (default deploy/qcow2-csi.yaml) with the helm built by
# build-tools.sh. `make manifests` runs it; tests/e2e checks deploy/ is
# current by rendering again and comparing. The agent's mTLS Secrets are not
# in it (agent.tls.source=secret): a key pair committed to git would be
# everyone's; docs/install.md shows how to make them. For the same reason the
# csi-snapshot-metadata sidecar is left out (snapshotMetadata.enabled=false:
# its SnapshotMetadataService must carry the CA of a certificate made for
# the cluster); docs/backup.md shows how to add it.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-deploy/qcow2-csi.yaml}
BIN=$(hack/e2e/build-tools.sh | tail -1)
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
export HELM_CACHE_HOME=$TMP/cache HELM_CONFIG_HOME=$TMP/config HELM_DATA_HOME=$TMP/data
{
  echo "# qcow2-csi: rendered from charts/qcow2-csi with its default values (but"
  echo "# agent.tls.source=secret, snapshotMetadata.enabled=false) by"
  echo "# \`make manifests\` (hack/e2e/render-manifests.sh). Do not edit: change the"
  echo "# chart and re-render. First create the Secrets qcow2-csi-agent-tls and"
  echo "# qcow2-csi-controller-tls (docs/install.md, \"Plain manifests\"), then"
  echo "# apply with: kubectl apply -f deploy/qcow2-csi.yaml"
  echo "apiVersion: v1"
  echo "kind: Namespace"
  echo "metadata:"
  echo "  name: qcow2-csi"
  "$BIN/helm" template qcow2-csi charts/qcow2-csi --namespace qcow2-csi --set agent.tls.source=secret --set snapshotMetadata.enabled=false
} > "$TMP/out.yaml"
mkdir -p "$(dirname "$OUT")"
mv "$TMP/out.yaml" "$OUT"
