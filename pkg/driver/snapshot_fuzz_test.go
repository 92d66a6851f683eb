package driver

import (
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParseSnapshotID: an ID that parses names a volume ID the validator
// accepts, re-encodes to itself, and its record and hidden image paths stay
// inside the pool's snapshots directory.
func FuzzParseSnapshotID(f *testing.F) {
	for _, s := range []string{"vol-0123@1795291914209777475", "vol-a@0", "vol-a@01", "../x@1", "vol-a@", "@1", "vol-a@1@2",
		"vol-a@18446744073709551616", "vol-a/b@1", strings.Repeat("a", 130) + "@1", "vol-a@-1", "vol-a@+1"} {
		f.Add(s)
	}
	p := &pool{dir: "/pool"}
	f.Fuzz(func(t *testing.T, id string) {
		vol, seq, ok := parseSnapshotID(id)
		if !ok {
			return
		}
		if checkVolumeID(vol) != nil {
			t.Fatalf("%q: volume %q fails validation", id, vol)
		}
		if snapshotID(vol, seq) != id {
			t.Fatalf("%q re-encodes to %q", id, snapshotID(vol, seq))
		}
		for _, path := range []string{p.snapMetaPath(id), p.hiddenImagePath(vol)} {
			if filepath.Dir(path) != "/pool/"+snapshotsDir {
				t.Fatalf("%q: path %s leaves the snapshots directory", id, path)
			}
		}
	})
}
