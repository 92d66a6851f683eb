package driver

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// TestRecordsOfThePreviousRelease reads records as the release before the
// record store wrote them (same files, same JSON), for each of the three
// kinds, and checks where the store writes them back.
func TestRecordsOfThePreviousRelease(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"vol-a.json": `{
  "version": 1,
  "id": "vol-a",
  "name": "pvc-a",
  "capacityBytes": 1048576,
  "parameters": {
    "clusterSize": 65536,
    "preallocation": "off",
    "lazyRefcounts": false
  },
  "created": "2026-11-01T10:00:00Z"
}
`,
		".snapshots/vol-a@1.json": `{
  "version": 1,
  "id": "vol-a@1",
  "name": "snap-a",
  "sourceVolumeId": "vol-a",
  "seq": 1,
  "sizeBytes": 1048576,
  "created": "2026-11-01T10:01:00Z"
}
`,
		".staged/vol-a.json": `{
  "id": "vol-a",
  "stagingPath": "/var/lib/kubelet/staging/vol-a",
  "block": false,
  "fsType": "ext4",
  "readOnly": false,
  "backend": "fuse",
  "devicePath": "/dev/loop3"
}
`,
		".staged/.tmp-vol-b.json-123": "{half a rec",
	}
	for name, c := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	p := &pool{dir: dir}
	d := &Driver{pool: p}

	vm, err := p.get("vol-a")
	if err != nil {
		t.Fatal(err)
	}
	wantVol := &volumeMeta{Version: 1, ID: "vol-a", Name: "pvc-a", Capacity: 1 << 20,
		Params: volumeParams{ClusterSize: 65536, Preallocation: "off"}, Created: time.Date(2026, 11, 1, 10, 0, 0, 0, time.UTC)}
	if !reflect.DeepEqual(vm, wantVol) {
		t.Errorf("volume record %+v, want %+v", vm, wantVol)
	}
	if ids, err := p.list(); err != nil || !reflect.DeepEqual(ids, []string{"vol-a"}) {
		t.Errorf("list = %q, %v; want [vol-a]", ids, err)
	}

	sms, err := p.listSnapshots()
	if err != nil {
		t.Fatal(err)
	}
	wantSnap := &snapshotMeta{Version: 1, ID: "vol-a@1", Name: "snap-a", Source: "vol-a", Seq: 1, Size: 1 << 20,
		Created: time.Date(2026, 11, 1, 10, 1, 0, 0, time.UTC)}
	if len(sms) != 1 || !reflect.DeepEqual(sms[0], wantSnap) {
		t.Errorf("snapshot records %+v, want [%+v]", sms, wantSnap)
	}

	recs, err := d.loadRecords()
	if err != nil {
		t.Fatal(err)
	}
	wantRec := &stageRecord{ID: "vol-a", StagingPath: "/var/lib/kubelet/staging/vol-a", FSType: "ext4", Backend: "fuse", DevicePath: "/dev/loop3"}
	if len(recs) != 1 || !reflect.DeepEqual(recs[0], wantRec) {
		t.Errorf("staged records %+v, want [%+v]", recs, wantRec)
	}
	if _, err := os.Stat(filepath.Join(dir, ".staged/.tmp-vol-b.json-123")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("loadRecords left the interrupted write: %v", err)
	}

	// Written back, each lands in the file it was read from, as the
	// previous release wrote it.
	if err := p.put(vm); err != nil {
		t.Fatal(err)
	}
	if err := p.putSnapshot(sms[0]); err != nil {
		t.Fatal(err)
	}
	if err := d.saveRecord(recs[0]); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"vol-a.json", ".snapshots/vol-a@1.json", ".staged/vol-a.json"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != files[name] {
			t.Errorf("%s rewritten as\n%s\nwant\n%s", name, b, files[name])
		}
	}

	if err := p.removeSnapshot("vol-a@1"); err != nil {
		t.Fatal(err)
	}
	if err := d.removeRecord("vol-a"); err != nil {
		t.Fatal(err)
	}
	if err := p.remove("vol-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.getSnapshot("vol-a@1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("getSnapshot after remove: %v, want ErrNotFound", err)
	}
	if _, err := p.get("vol-a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("get after remove: %v, want ErrNotFound", err)
	}
	if recs, err := d.loadRecords(); err != nil || len(recs) != 0 {
		t.Errorf("loadRecords after remove: %v, %v; want none", recs, err)
	}
}
