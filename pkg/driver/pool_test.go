package driver

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

func TestVolumeIDForName(t *testing.T) {
	a, b := volumeIDForName("pvc-1"), volumeIDForName("pvc-2")
	if a != volumeIDForName("pvc-1") || a == b {
		t.Fatalf("IDs not deterministic/distinct: %s %s", a, b)
	}
	for _, n := range []string{"pvc-1", "../../etc", "a/b", "\x00", string(make([]byte, 256))} {
		if err := checkVolumeID(volumeIDForName(n)); err != nil {
			t.Errorf("ID for %q is invalid: %v", n, err)
		}
	}
	if got, want := len(a), 36; got != want {
		t.Errorf("len(ID) = %d, want %d", got, want)
	}
}

// TestPoolRecover: what an interrupted create or delete leaves is removed at
// start; committed volumes and foreign files stay.
func TestPoolRecover(t *testing.T) {
	p, err := openPool(t.TempDir(), "test-node")
	if err != nil {
		t.Fatal(err)
	}
	keep := &volumeMeta{ID: "vol-keep", Name: "keep", Capacity: 1 << 20, Params: volumeParams{ClusterSize: 65536, Preallocation: "off"}, Created: time.Unix(1, 0).UTC()}
	if err := p.put(keep); err != nil {
		t.Fatal(err)
	}
	touch := func(n string) {
		if err := os.WriteFile(filepath.Join(p.dir, n), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	touch("vol-keep.qcow2")
	touch(".tmp-vol-new.qcow2")        // create interrupted before rename
	touch("vol-orphan.qcow2")          // delete interrupted after the metadata went
	touch(".tmp-vol-keep.json-123456") // metadata write interrupted
	touch("notes.txt")                 // not ours
	touch("bad..name.qcow2")           // not a valid ID: not ours either
	removed, err := p.recover()
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(removed)
	if want := []string{".tmp-vol-keep.json-123456", ".tmp-vol-new.qcow2", "vol-orphan.qcow2"}; !reflect.DeepEqual(removed, want) {
		t.Fatalf("removed %v, want %v", removed, want)
	}
	var left []string
	ents, _ := os.ReadDir(p.dir)
	for _, e := range ents {
		left = append(left, e.Name())
	}
	if want := []string{"bad..name.qcow2", "notes.txt", "vol-keep.json", "vol-keep.qcow2"}; !reflect.DeepEqual(left, want) {
		t.Fatalf("left %v, want %v", left, want)
	}
	got, err := p.get("vol-keep")
	if err != nil || !reflect.DeepEqual(got, keep) {
		t.Fatalf("get = %+v, %v; want %+v", got, err, keep)
	}
	if _, err := p.get("vol-orphan"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("orphan: %v", err)
	}
	ids, err := p.list()
	if err != nil || !reflect.DeepEqual(ids, []string{"vol-keep"}) {
		t.Fatalf("list = %v, %v", ids, err)
	}
}

func TestPoolCorruptMetadata(t *testing.T) {
	p, _ := openPool(t.TempDir(), "test-node")
	os.WriteFile(p.metaPath("vol-x"), []byte("{not json"), 0o600)
	if _, err := p.get("vol-x"); err == nil || errors.Is(err, ErrNotFound) {
		t.Fatalf("corrupt metadata: %v, want a non-NotFound error", err)
	}
	os.WriteFile(p.metaPath("vol-y"), []byte(`{"version":1,"id":"vol-z"}`), 0o600)
	if _, err := p.get("vol-y"); err == nil || err.Error() != `volume "vol-y": metadata `+p.metaPath("vol-y")+` names volume "vol-z" version 1` {
		t.Fatalf("mismatched metadata: %v", err)
	}
}

func TestVolumeSize(t *testing.T) {
	const c = 65536
	tests := []struct {
		req, lim, want int64
		err            error
	}{
		{0, 0, 1 << 30, nil},
		{1, 0, c, nil},
		{c, 0, c, nil},
		{c + 1, 0, 2 * c, nil},
		{0, 100000, c, nil},
		{c + 1, 2 * c, 2 * c, nil},
		{c + 1, c + 2, 0, ErrOutOfRange},
		{0, 1000, 0, ErrOutOfRange},
		{-1, 0, 0, ErrInvalid},
		{1 << 40, 0, 1 << 40, nil},
		{1<<51 + 1, 0, 0, ErrOutOfRange},
	}
	for _, tc := range tests {
		got, err := volumeSize(&csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim}, 1<<30, volumeParams{ClusterSize: c})
		if got != tc.want || !errors.Is(err, tc.err) || (err == nil) != (tc.err == nil) {
			t.Errorf("volumeSize(%d, %d) = %d, %v; want %d, %v", tc.req, tc.lim, got, err, tc.want, tc.err)
		}
	}
	// Extended L2 entries are 16 bytes: half the largest image. Encrypted
	// volumes have them by default.
	for _, p := range []volumeParams{{ClusterSize: c, Encrypted: true}, {ClusterSize: c, ExtendedL2: "true"}} {
		if got, err := volumeSize(&csi.CapacityRange{RequiredBytes: 1<<50 + 1}, 1<<30, p); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("volumeSize(2^50+1) with %+v = %d, %v; want out of range (1 PiB at most)", p, got, err)
		}
		if got, err := volumeSize(&csi.CapacityRange{RequiredBytes: 1 << 50}, 1<<30, p); err != nil || got != 1<<50 {
			t.Errorf("volumeSize(2^50) with %+v = %d, %v; want 2^50", p, got, err)
		}
	}
}
