package qcow2

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
)

// powerLossWrites writes k runs of random bytes at random offsets of img,
// from seed, and flushes nothing.
func powerLossWrites(t *testing.T, img *Image, seed int64, k int) {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	for range k {
		n := 1 + rng.Intn(30000)
		off := rng.Int63n(img.Size() - int64(n))
		if _, err := img.WriteAt(bytes.Repeat([]byte{byte(1 + rng.Intn(255))}, n), off); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSnapshotPowerLoss: CreateSnapshot after writes nobody flushed
// (copies over an older snapshot's clusters among them, whose frees are
// pending), with the power lost before each of its writes and syncs in
// turn, and right after it returns. After each loss the image opens (a
// dirty one is repaired there), the new snapshot is absent or holds
// exactly the disk as it was when it was taken, present for certain once
// CreateSnapshot returned; the older snapshot is intact; qemu-img check
// finds no corruption (on compat=0.10, which has no dirty bit, COPIED
// flags may lag the refcounts as qemu's own ordering lets them) and, with
// the snapshot there, no leak.
func TestSnapshotPowerLoss(t *testing.T) {
	const pass = "power"
	for _, tc := range []struct {
		name string
		co   CreateOptions
		old  bool // an older snapshot, so that the writes copy and free
	}{
		{"v3", CreateOptions{ClusterSize: 4096}, true},
		{"v3-no-frees", CreateOptions{ClusterSize: 4096}, false},
		{"lazy-refcounts", CreateOptions{ClusterSize: 4096, LazyRefcounts: true}, true},
		{"extended-l2", CreateOptions{ClusterSize: 65536, ExtendedL2: true}, true},
		{"v2", CreateOptions{ClusterSize: 4096, Version: 2}, true},
		{"encrypted", CreateOptions{ClusterSize: 4096, Encryption: &EncryptionOptions{Passphrase: []byte(pass), IterTime: luksTestIterTime}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each case spends most of its time in qemu-img check
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			co := tc.co
			co.Size = 8 << 20
			img, err := Create(base, co)
			if err != nil {
				t.Fatal(err)
			}
			var opts OpenOptions
			check := func(path string) (checkResult, string) { return qemuCheck(t, path) }
			if co.Encryption != nil {
				opts.Passphrase = []byte(pass)
				check = func(path string) (checkResult, string) { return qemuCheckSecret(t, path, pass) }
			}
			powerLossWrites(t, img, 1, 20)
			var oldData []byte
			if tc.old {
				if _, err := img.CreateSnapshot("old"); err != nil {
					t.Fatal(err)
				}
				oldData = ourSnapshotRaw(t, img, "old")
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			baseBytes, err := os.ReadFile(base)
			if err != nil {
				t.Fatal(err)
			}
			for _, keepLast := range []bool{false, true} {
				t.Run(fmt.Sprintf("keepLast=%v", keepLast), func(t *testing.T) {
					pl := powerLoss{dir: dir, base: baseBytes, opts: opts, old: oldData, keepLast: keepLast, v2: co.Version == 2, check: check}
					for k := 1; ; k++ {
						if pl.at(t, k) {
							t.Logf("%d crash points", k)
							return
						}
					}
				})
			}
		})
	}
}

// powerLoss is one case of TestSnapshotPowerLoss.
type powerLoss struct {
	dir      string
	base     []byte // the image before the workload
	opts     OpenOptions
	old      []byte // the older snapshot's disk; nil: none
	keepLast bool
	v2       bool
	check    func(path string) (checkResult, string)
}

// at runs the workload on a copy of the image with the power lost before
// the k-th write or sync of CreateSnapshot (or right after it returns),
// and checks the image left; it reports whether CreateSnapshot returned
// before the k-th (the last crash point).
func (pl powerLoss) at(t *testing.T, k int) bool {
	t.Helper()
	work := filepath.Join(pl.dir, "work.qcow2")
	if err := os.WriteFile(work, pl.base, 0o644); err != nil {
		t.Fatal(err)
	}
	cf := &powerLossFile{drop: dropUnsynced, dir: pl.dir}
	if pl.keepLast {
		cf.drop = keepLatestUnsynced
	}
	o := pl.opts
	o.wrapFile = func(f *os.File) imageFile { cf.File = f; return cf }
	img, err := Open(work, o)
	if err != nil {
		t.Fatal(err)
	}
	powerLossWrites(t, img, 2, 30)
	want := make([]byte, img.Size())
	if _, err := img.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	cf.mu.Lock()
	crashAt := cf.ops + k
	cf.crashAt = func(op powerLossOp) bool { return op.n == crashAt }
	cf.mu.Unlock()
	if _, err := img.CreateSnapshot("new"); err != nil {
		t.Fatal(err)
	}
	cf.mu.Lock()
	returned := len(cf.crashes) == 0
	if returned {
		cf.saveCrashImage() // the power is lost right after
	}
	crashed, saveErr := cf.crashes[0], cf.err
	cf.mu.Unlock()
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if saveErr != nil {
		t.Fatal(saveErr)
	}
	c, err := Open(crashed, pl.opts)
	if err != nil {
		t.Fatalf("crash point %d: open: %v", k, err)
	}
	found, oldFound := false, false
	for _, s := range c.Snapshots() {
		switch s.Name {
		case "new":
			found = true
			if !bytes.Equal(ourSnapshotRaw(t, c, s.ID), want) {
				t.Errorf("crash point %d: snapshot new does not hold the disk as it was taken", k)
			}
		case "old":
			oldFound = true
			if !bytes.Equal(ourSnapshotRaw(t, c, s.ID), pl.old) {
				t.Errorf("crash point %d: snapshot old changed", k)
			}
		}
	}
	if oldFound != (pl.old != nil) {
		t.Errorf("crash point %d: snapshot old there: %v, want %v", k, oldFound, pl.old != nil)
	}
	if returned && !found {
		t.Errorf("crash point %d: snapshot new missing after CreateSnapshot returned", k)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("crash point %d: close: %v", k, err)
	}
	r, out := pl.check(crashed)
	if r.CheckErrors != 0 || (!pl.v2 && (r.Corruptions != 0 || (found && r.Leaks != 0))) {
		t.Errorf("crash point %d (snapshot there: %v): qemu-img check: %s", k, found, out)
	}
	return returned
}
