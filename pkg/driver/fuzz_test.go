package driver

import (
	"errors"
	"math/bits"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzCheckVolumeID: an ID the validator accepts always names a file
// directly inside the pool, never elsewhere.
func FuzzCheckVolumeID(f *testing.F) {
	for _, s := range []string{"vol-0123", "../x", "..", "a/b", ".hidden", "a..b", "x\x00y", strings.Repeat("a", 129), "", "A_b-9.c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if checkVolumeID(id) != nil {
			return
		}
		pool := "/pool"
		for _, p := range []string{filepath.Join(pool, id+imageSuffix), filepath.Join(pool, id+metaSuffix)} {
			if filepath.Dir(p) != pool || strings.HasPrefix(filepath.Base(p), ".") {
				t.Fatalf("accepted ID %q makes path %s outside the pool or hidden", id, p)
			}
		}
		if len(id) > maxIDLength {
			t.Fatalf("accepted ID of %d bytes", len(id))
		}
	})
}

// FuzzParseParams: no input panics; what is accepted is within the limits.
func FuzzParseParams(f *testing.F) {
	f.Add("clusterSize", "64k", "mkfsOptions", "-L x")
	f.Add("preallocation", "full", "lazyRefcounts", "true")
	f.Add("clusterSize", "9223372036854775807K", "fsType", "xfs")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		p, err := parseParams(map[string]string{k1: v1, k2: v2})
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if p.ClusterSize < 512 || p.ClusterSize > 2<<20 || bits.OnesCount64(uint64(p.ClusterSize)) != 1 {
			t.Fatalf("accepted cluster size %d", p.ClusterSize)
		}
		if !preallocationModes[p.Preallocation] || (p.FSType != "" && !supportedFSTypes[p.FSType]) {
			t.Fatalf("accepted %+v", p)
		}
	})
}

// FuzzParseSnapshotParams: no input panics; an accepted type is one of the
// two, and a refusal wraps ErrInvalid.
func FuzzParseSnapshotParams(f *testing.F) {
	f.Add("blockMetadataType", "FIXED_LENGTH", "csi.storage.k8s.io/volumesnapshot/name", "s")
	f.Add("blockMetadataType", "fixed_length", "x", "y")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		p, err := parseSnapshotParams(map[string]string{k1: v1, k2: v2}, blockMetadataVariable)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if _, ok := blockMetadataTypes[p.BlockMetadataType]; !ok {
			t.Fatalf("accepted %+v", p)
		}
	})
}

// FuzzPoolMetadata: a metadata file with any content is either a valid
// record of its volume or an error naming the file; never a panic.
func FuzzPoolMetadata(f *testing.F) {
	f.Add([]byte(`{"version":1,"id":"vol-x","name":"n","capacityBytes":65536,"parameters":{"clusterSize":65536,"preallocation":"off","lazyRefcounts":false}}`))
	f.Add([]byte(`{"version":1,"id":"vol-y"}`))
	f.Add([]byte(`{`))
	dir := f.TempDir()
	p := &pool{dir: dir}
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(p.metaPath("vol-x"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		m, err := p.get("vol-x")
		if err != nil {
			if errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), p.metaPath("vol-x")) {
				t.Fatalf("error %v: want one naming %s", err, p.metaPath("vol-x"))
			}
			return
		}
		if m.ID != "vol-x" || m.Version != metaVersion {
			t.Fatalf("accepted %+v", m)
		}
	})
}

// FuzzMkfsOptions: no input panics; what is accepted for a filesystem
// names, in option position, only options of its allowlist, and never a
// refused sub-option.
func FuzzMkfsOptions(f *testing.F) {
	for _, s := range []string{"-L data -b 4096", "-d /etc", "-qd /etc", "-E root_owner=0:0,offset=1", "-L -d", "-d agcount=4,name=/dev/sda", "-- -d x", "-J device=/dev/sda"} {
		f.Add("ext4", s)
		f.Add("xfs", s)
	}
	f.Fuzz(func(t *testing.T, fsType, s string) {
		args, err := mkfsOptionsFor(fsType, s)
		if err != nil {
			return
		}
		flags := mkfsFlags[fsType]
		for i := 0; i < len(args); i++ {
			fl, ok := flags[args[i]]
			if !ok || fl.refused != "" {
				t.Fatalf("%s %q: accepted %q in option position", fsType, s, args[i])
			}
			if !fl.value {
				continue
			}
			i++
			for _, sub := range strings.Split(args[i], ",") {
				name, _, _ := strings.Cut(sub, "=")
				if _, bad := fl.refusedSubs[name]; bad || (fl.subs != nil && !fl.subs[name]) {
					t.Fatalf("%s %q: accepted sub-option %q of %s", fsType, s, name, args[i-1])
				}
			}
		}
	})
}
