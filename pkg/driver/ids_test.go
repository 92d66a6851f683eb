package driver

import (
	"strings"
	"testing"
)

// TestIDs: the IDs a node issues parse back to their volume, sequence and
// owner, stay within 128 bytes for every node name a Kubernetes node may
// have, and a volume's snapshots carry the volume's own suffix.
func TestIDs(t *testing.T) {
	local := volumeIDForName("pvc-1")
	for _, node := range []string{"n", "node-a", "ip-10-0-0-1.ec2.internal", strings.Repeat("a", maxNamedOwner), strings.Repeat("b", maxNamedOwner+1), strings.Repeat("c", 253)} {
		vol := qualifiedVolumeID(local, node)
		if len(vol) > maxIDLength {
			t.Errorf("node of %d bytes: volume ID of %d bytes", len(node), len(vol))
		}
		ref, err := parseVolumeID(vol)
		if err != nil || ref.Local != local || !ref.Owner.is(node) || ref.Owner.legacy() {
			t.Errorf("parseVolumeID(%q) = %+v, %v", vol, ref, err)
		}
		if hashed := len(node) > maxNamedOwner; hashed != (ref.Owner.Hash != "") {
			t.Errorf("node of %d bytes: owner %+v", len(node), ref.Owner)
		}
		for _, seq := range []uint64{0, 7, 1796191669547557576, ^uint64(0)} {
			snap := snapshotID(vol, seq)
			if len(snap) > maxIDLength {
				t.Errorf("node of %d bytes, seq %d: snapshot ID of %d bytes", len(node), seq, len(snap))
			}
			s, ok := parseSnapshotRef(snap)
			if !ok || s.Volume != vol || s.Seq != seq || !s.Owner.is(node) {
				t.Errorf("parseSnapshotRef(%q) = %+v, %v; want volume %q seq %d", snap, s, ok, vol, seq)
			}
		}
	}
	if o := (owner{Name: "node-a"}); o.is("node-b") || !o.is("node-a") {
		t.Error("owner by name")
	}
	if o := (owner{Hash: nodeHash("node-a")}); o.is("node-b") || !o.is("node-a") {
		t.Error("owner by hash")
	}
}

// TestParseIDs: legacy IDs parse as legacy; malformed suffixes are refused
// (volumes) or not ours (snapshots).
func TestParseIDs(t *testing.T) {
	vols := []struct {
		id    string
		local string
		owner owner
		bad   bool
	}{
		{"vol-abc", "vol-abc", owner{}, false},
		{"vol-abc@node-a", "vol-abc", owner{Name: "node-a"}, false},
		{"vol-abc#0123456789abcdef", "vol-abc", owner{Hash: "0123456789abcdef"}, false},
		{"vol-abc#0123", "", owner{}, true},             // short hash
		{"vol-abc#0123456789ABCDEF", "", owner{}, true}, // upper-case hash
		{"vol-abc@", "", owner{}, true},
		{"vol-abc@-a", "", owner{}, true},
		{"vol-abc@a@b", "", owner{}, true},
		{"vol-abc@a#0123456789abcdef", "", owner{}, true},
		{"@node", "", owner{}, true},
		{"vol/../x@n", "", owner{}, true},
	}
	for _, tc := range vols {
		ref, err := parseVolumeID(tc.id)
		if (err != nil) != tc.bad || (!tc.bad && (ref.Local != tc.local || ref.Owner != tc.owner)) {
			t.Errorf("parseVolumeID(%q) = %+v, %v", tc.id, ref, err)
		}
	}
	snaps := []struct {
		id  string
		vol string
		seq uint64
		ok  bool
	}{
		{"vol-abc@5", "vol-abc", 5, true},
		{"vol-abc@5@node-a", "vol-abc@node-a", 5, true},
		{"vol-abc@5#0123456789abcdef", "vol-abc#0123456789abcdef", 5, true},
		{"vol-abc@05@n", "", 0, false},
		{"vol-abc@@n", "", 0, false},
		{"vol-abc@5@", "", 0, false},
		{"vol-abc@5@n@m", "", 0, false},
		{"vol-abc#0123456789abcdef@5", "", 0, false},
		{"vol-abc", "", 0, false},
		{"vol-abc@x", "", 0, false},
		{"vol-abc@18446744073709551616", "", 0, false},
	}
	for _, tc := range snaps {
		r, ok := parseSnapshotRef(tc.id)
		if ok != tc.ok || (ok && (r.Volume != tc.vol || r.Seq != tc.seq)) {
			t.Errorf("parseSnapshotRef(%q) = %+v, %v", tc.id, r, ok)
		}
	}
}

// FuzzParseIDs: the parsers never panic, what they accept is within the
// length limit and formats back to itself, and no accepted ID can reach
// a path outside the pool.
func FuzzParseIDs(f *testing.F) {
	for _, s := range []string{"vol-abc", "vol-abc@node-a", "vol-abc#0123456789abcdef", "vol-abc@5@node-a", "vol-abc@5#0123456789abcdef", "vol-abc@5", "a@b@c", "..@x", "#", "@"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if ref, err := parseVolumeID(id); err == nil {
			if len(id) > maxIDLength || ref.Local+ref.Owner.suffix() != id || strings.ContainsAny(ref.Local, "/@#") || strings.Contains(id, "..") {
				t.Fatalf("parseVolumeID(%q) = %+v", id, ref)
			}
			p := &pool{dir: "/pool", node: "node-a"}
			if f := p.file(id); strings.Contains(f, "/") || f == "." || f == ".." {
				t.Fatalf("file(%q) = %q", id, f)
			}
		}
		if r, ok := parseSnapshotRef(id); ok {
			if len(id) > maxIDLength || snapshotID(r.Volume, r.Seq) != id {
				t.Fatalf("parseSnapshotRef(%q) = %+v, formats to %q", id, r, snapshotID(r.Volume, r.Seq))
			}
		}
	})
}
