package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Volume and snapshot IDs name the node that holds them, so that a
// controller with no pool and no database (router.go) can route any call to
// the owning node's agent, even after a restart:
//
//	volume:   vol-<32 hex>@<node>        or  vol-<32 hex>#<16 hex>
//	snapshot: vol-<32 hex>@<seq>@<node>  or  vol-<32 hex>@<seq>#<16 hex>
//
// The part before the owner suffix is the local ID, what IDs were before
// nodes were named (pools keep their file names: a volume is still
// <local>.qcow2). "#<16 hex>" is the start of sha256(node), used when the
// node's name is too long for the snapshot form to stay within CSI's 128
// bytes; the controller resolves it by hashing the node names it knows.
// Which form a node uses depends only on its name, so a volume and its
// snapshots always carry the same suffix and a snapshot ID gives back its
// volume's ID exactly. IDs without a suffix are legacy (a single-node
// install before this format); the controller finds their node by asking
// the agents.
const (
	ownerNameSep = "@"
	ownerHashSep = "#"
	ownerHashLen = 16 // hex digits
	// maxSeqDigits is the longest decimal uint64.
	maxSeqDigits = 20
	// localVolumeIDLen is len("vol-") + 32 hex digits (volumeIDForName).
	localVolumeIDLen = 4 + 32
	// maxNamedOwner is the longest node name that still fits a snapshot ID
	// of the longest sequence: 128 - 36 - len("@") - 20 - len("@").
	maxNamedOwner = maxIDLength - localVolumeIDLen - 1 - maxSeqDigits - 1
)

// validNodeName is what a node may be called for its name to go into IDs:
// the characters of a Kubernetes node name (a DNS subdomain), in either
// case, and neither of the separators.
var validNodeName = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$`)

var validOwnerHash = regexp.MustCompile(`^[0-9a-f]{16}$`)

// checkNodeName refuses a node ID that cannot qualify IDs.
func checkNodeName(node string) error {
	if len(node) > 253 || !validNodeName.MatchString(node) {
		return fmt.Errorf("node ID %q: want at most 253 letters, digits, '-', '.' and '_', beginning and ending with a letter or digit", node)
	}
	return nil
}

// nodeHash is the hashed owner suffix of a node (without the '#').
func nodeHash(node string) string {
	sum := sha256.Sum256([]byte(node))
	return hex.EncodeToString(sum[:ownerHashLen/2])
}

// ownerSuffix is the suffix a node appends to the IDs it issues.
func ownerSuffix(node string) string {
	if len(node) <= maxNamedOwner {
		return ownerNameSep + node
	}
	return ownerHashSep + nodeHash(node)
}

// owner is who an ID says holds it: a node name, a node hash, or nobody
// (a legacy ID).
type owner struct {
	Name string // from "@name"
	Hash string // from "#hash"
}

func (o owner) legacy() bool { return o.Name == "" && o.Hash == "" }

// is reports whether the owner is node.
func (o owner) is(node string) bool {
	switch {
	case o.Name != "":
		return o.Name == node
	case o.Hash != "":
		return o.Hash == nodeHash(node)
	}
	return false
}

func (o owner) String() string {
	switch {
	case o.Name != "":
		return o.Name
	case o.Hash != "":
		return "the node hashed " + o.Hash
	}
	return "no node (legacy ID)"
}

// splitOwner cuts an owner suffix off the end of id: the last '@' or '#'
// whose remainder is a valid node name or hash. A remainder that is neither
// leaves id whole (for snapshots, "@<seq>" with no suffix is legacy).
func splitOwner(id string) (local string, o owner) {
	i := strings.LastIndexAny(id, ownerNameSep+ownerHashSep)
	if i <= 0 {
		return id, owner{}
	}
	rest := id[i+1:]
	if id[i] == ownerHashSep[0] {
		if validOwnerHash.MatchString(rest) {
			return id[:i], owner{Hash: rest}
		}
		return id, owner{}
	}
	if checkNodeName(rest) != nil {
		return id, owner{}
	}
	return id[:i], owner{Name: rest}
}

// volumeRef is a parsed volume ID.
type volumeRef struct {
	Local string // the pool's file name stem
	Owner owner
}

// parseVolumeID parses a volume ID (checkVolumeID's rules): the local ID
// never holds '@' or '#', so everything after the first of them is the
// owner.
func parseVolumeID(id string) (volumeRef, error) {
	if err := checkVolumeID(id); err != nil {
		return volumeRef{}, err
	}
	i := strings.IndexAny(id, ownerNameSep+ownerHashSep)
	if i < 0 {
		return volumeRef{Local: id}, nil
	}
	local, o := splitOwner(id)
	if len(local) != i {
		return volumeRef{}, fmt.Errorf("%w: volume ID %q: owner suffix %q is neither @<node name> nor #<%d hex digits>", ErrInvalid, id, id[i:], ownerHashLen)
	}
	return volumeRef{Local: local, Owner: o}, nil
}

// snapshotRef is a parsed snapshot ID.
type snapshotRef struct {
	Volume string // the source volume's ID, with the same owner suffix
	Seq    uint64
	Owner  owner
}

// parseSnapshotRef parses a snapshot ID this driver issued; ok is false for
// anything else (including IDs that would make unsafe paths).
func parseSnapshotRef(id string) (snapshotRef, bool) {
	if len(id) > maxIDLength {
		return snapshotRef{}, false
	}
	localVol, rest, found := strings.Cut(id, snapshotIDSep)
	if !found || checkVolumeID(localVol) != nil || strings.ContainsAny(localVol, ownerHashSep) {
		return snapshotRef{}, false
	}
	s := rest
	var o owner
	if i := strings.IndexAny(rest, ownerNameSep+ownerHashSep); i >= 0 {
		var local string
		local, o = splitOwner(rest)
		if len(local) != i {
			return snapshotRef{}, false
		}
		s = rest[:i]
	}
	if s == "" || len(s) > maxSeqDigits {
		return snapshotRef{}, false
	}
	seq, err := strconv.ParseUint(s, 10, 64)
	if err != nil || strconv.FormatUint(seq, 10) != s {
		return snapshotRef{}, false
	}
	return snapshotRef{Volume: localVol + o.suffix(), Seq: seq, Owner: o}, true
}

// suffix is the owner as it is written at the end of an ID.
func (o owner) suffix() string {
	switch {
	case o.Name != "":
		return ownerNameSep + o.Name
	case o.Hash != "":
		return ownerHashSep + o.Hash
	}
	return ""
}

// qualifiedVolumeID is the ID a node issues for a volume of local ID local.
func qualifiedVolumeID(local, node string) string { return local + ownerSuffix(node) }

// snapshotID is the ID of the snapshot of sequence seq of volume vol: the
// volume's local ID, the sequence, and the volume's owner suffix.
func snapshotID(vol string, seq uint64) string {
	local, o := splitOwner(vol)
	return local + snapshotIDSep + strconv.FormatUint(seq, 10) + o.suffix()
}

// parseSnapshotID is parseSnapshotRef for callers that need the volume and
// sequence.
func parseSnapshotID(id string) (vol string, seq uint64, ok bool) {
	r, ok := parseSnapshotRef(id)
	return r.Volume, r.Seq, ok
}

// checkOwner refuses an ID qualified with another node with a message
// naming both: a controller routed it to the wrong agent, or a PV moved
// between clusters. Legacy IDs are looked up in the pool as they are.
func (d *Driver) checkOwner(kind, id string, o owner) error {
	if o.legacy() || o.is(d.opts.NodeID) {
		return nil
	}
	return fmt.Errorf("%w: %s %q belongs to %s, this is node %s", ErrNotFound, kind, id, o, d.opts.NodeID)
}

// ownVolume is checkOwner for a volume ID that passed checkVolumeID.
func (d *Driver) ownVolume(id string) error {
	_, o := splitOwner(id)
	return d.checkOwner("volume", id, o)
}
