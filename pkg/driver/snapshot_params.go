package driver

import (
	"fmt"
	"sort"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// VolumeSnapshotClass parameters (CreateSnapshotRequest.parameters). As with
// StorageClass parameters, unknown keys are refused by name except the
// csi.storage.k8s.io/* keys the external-snapshotter adds.
const (
	// paramBlockMetadataType chooses how the SnapshotMetadata service
	// reports this snapshot's ranges: its requests carry no type, so the
	// backup tool's choice comes through the snapshot class.
	paramBlockMetadataType = "blockMetadataType"

	blockMetadataFixed    = "FIXED_LENGTH"
	blockMetadataVariable = "VARIABLE_LENGTH"
)

var blockMetadataTypes = map[string]csi.BlockMetadataType{
	blockMetadataFixed:    csi.BlockMetadataType_FIXED_LENGTH,
	blockMetadataVariable: csi.BlockMetadataType_VARIABLE_LENGTH,
}

// snapshotParams are the validated parameters of a CreateSnapshot.
type snapshotParams struct {
	BlockMetadataType string
}

// parseSnapshotParams validates p; def is the driver's default block
// metadata type (Options.BlockMetadataType).
func parseSnapshotParams(p map[string]string, def string) (snapshotParams, error) {
	v := snapshotParams{BlockMetadataType: def}
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		val := p[k]
		switch {
		case k == paramBlockMetadataType:
			if _, ok := blockMetadataTypes[val]; !ok {
				return v, fmt.Errorf("%w: parameter %s=%q: want %s or %s", ErrInvalid, k, val, blockMetadataFixed, blockMetadataVariable)
			}
			v.BlockMetadataType = val
		case strings.HasPrefix(k, k8sParamPrefix):
		default:
			return v, fmt.Errorf("%w: unknown snapshot parameter %q (known: %s)", ErrInvalid, k, paramBlockMetadataType)
		}
	}
	return v, nil
}

// blockMetadataType is how ranges of snapshot m are reported.
func (d *Driver) blockMetadataType(m *snapshotMeta) csi.BlockMetadataType {
	if t, ok := blockMetadataTypes[m.BlockMetadataType]; ok {
		return t
	}
	return blockMetadataTypes[d.opts.BlockMetadataType]
}
