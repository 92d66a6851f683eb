package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
)

// TestSnapshotsUnderConcurrentWrites takes snapshots while writers keep
// rewriting whole blocks, each block always with a single (writer, version)
// stamp. Every snapshot must hold, for every block, one complete version
// (never a torn mix), versions never go backwards from one snapshot to the
// next, and the image must check clean. Run under -race it also checks the
// locking.
func TestSnapshotsUnderConcurrentWrites(t *testing.T) {
	const (
		block   = 24 << 10 // straddles 64 KiB clusters now and then
		blocks  = 48
		writers = 4
		snaps   = 8
	)
	p := filepath.Join(t.TempDir(), "c.qcow2")
	img, err := Create(p, CreateOptions{Size: block * blocks})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	stamp := func(w, v, b int) []byte {
		var s [8]byte
		binary.BigEndian.PutUint16(s[:], uint16(w))
		binary.BigEndian.PutUint16(s[2:], uint16(b))
		binary.BigEndian.PutUint32(s[4:], uint32(v))
		return bytes.Repeat(s[:], block/8)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, writers+1)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for v := 1; ; v++ {
				select {
				case <-stop:
					return
				default:
				}
				// Writer w owns blocks w, w+writers, ...
				for b := w; b < blocks; b += writers {
					if _, err := img.WriteAt(stamp(w, v, b), int64(b)*block); err != nil {
						errs <- err
						return
					}
				}
			}
		}(w)
	}
	var ids []string
	for i := 0; i < snaps; i++ {
		info, err := img.CreateSnapshot(fmt.Sprintf("c%d", i))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, info.ID)
	}
	// A view reads the same bytes while writers and new snapshots go on.
	v, err := img.OpenSnapshot(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, v.Size())
	if _, err := v.ReadAt(first, 0); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if _, err := img.CreateSnapshot(fmt.Sprintf("more%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	again := make([]byte, v.Size())
	if _, err := v.ReadAt(again, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first, again) {
		t.Fatal("a snapshot view changed while the disk was written")
	}
	v.Close()
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	last := make([]uint32, blocks)
	for _, id := range ids {
		data := ourSnapshotRaw(t, img, id)
		for b := 0; b < blocks; b++ {
			chunk := data[b*block : (b+1)*block]
			if allZeroBytes(chunk) {
				if last[b] != 0 {
					t.Fatalf("snapshot %s block %d: zero after version %d", id, b, last[b])
				}
				continue
			}
			v := binary.BigEndian.Uint32(chunk[4:])
			w := int(binary.BigEndian.Uint16(chunk))
			if !bytes.Equal(chunk, stamp(w, int(v), b)) {
				t.Fatalf("snapshot %s block %d is torn", id, b)
			}
			if v < last[b] {
				t.Fatalf("snapshot %s block %d: version %d after %d", id, b, v, last[b])
			}
			last[b] = v
		}
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	checkCleanWhen(t, p, "after snapshots under concurrent writes")
}

func allZeroBytes(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
