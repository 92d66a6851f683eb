package snapshotter

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

const testDisk = 4 << 20

func newImage(t *testing.T, size int64) *qcow2.Image {
	t.Helper()
	img, err := qcow2.Create(filepath.Join(t.TempDir(), "v.qcow2"), qcow2.CreateOptions{Size: size, ClusterSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

type snap struct {
	name    string
	seq     uint64
	data    []byte
	deleted bool
}

func covered(rs []Range, off int64) bool {
	for _, r := range rs {
		if off >= r.Offset && off < r.Offset+r.Length {
			return true
		}
	}
	return false
}

func checkSorted(t *testing.T, rs []Range) {
	t.Helper()
	for i := 1; i < len(rs); i++ {
		if rs[i].Offset < rs[i-1].Offset+rs[i-1].Length {
			t.Fatalf("ranges overlap or descend: %v", rs)
		}
	}
}

// TestDeltaProperty: random writes, zero writes and discards between
// snapshots, deletes in random order; every delta between a (possibly
// deleted) base and a live target covers every byte that differs, and the
// table delta lies inside the bitmap delta.
func TestDeltaProperty(t *testing.T) {
	for seed := int64(1); seed <= 3; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			img := newImage(t, testDisk)
			model := make([]byte, testDisk)
			var snaps []*snap
			for step := 0; step < 40; step++ {
				switch k := rng.Intn(10); {
				case k < 5:
					off := rng.Int63n(testDisk - 1)
					n := 1 + rng.Int63n(min(200<<10, testDisk-off))
					p := make([]byte, n)
					rng.Read(p)
					if _, err := img.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
				case k == 5:
					off := rng.Int63n(testDisk/512) * 512
					n := (1 + rng.Int63n(256)) * 512
					n = min(n, testDisk-off)
					if err := img.WriteZeroes(off, n, qcow2.ZeroMayUnmap); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case k == 6:
					// Whole clusters only: a partial discard leaves data.
					off := rng.Int63n(testDisk/(64<<10)) * (64 << 10)
					n := min((1+rng.Int63n(4))*(64<<10), testDisk-off)
					if err := img.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case k < 9:
					s := &snap{name: fmt.Sprintf("s%d", step), seq: uint64(100 + step), data: bytes.Clone(model)}
					if _, err := Take(img, s.name, s.seq); err != nil {
						t.Fatal(err)
					}
					snaps = append(snaps, s)
				default:
					var live []*snap
					for _, s := range snaps {
						if !s.deleted {
							live = append(live, s)
						}
					}
					if len(live) > 0 {
						s := live[rng.Intn(len(live))]
						if err := Delete(img, s.name, s.seq); err != nil {
							t.Fatal(err)
						}
						s.deleted = true
					}
				}
			}
			checked := 0
			for _, tg := range snaps {
				if tg.deleted {
					continue
				}
				for _, b := range snaps {
					if b.seq >= tg.seq {
						continue
					}
					d, err := Delta(img, b.seq, tg.seq, 0, testDisk)
					if err != nil {
						t.Fatal(err)
					}
					checkSorted(t, d)
					mask := make([]bool, testDisk)
					for _, r := range d {
						for o := r.Offset; o < r.Offset+r.Length; o++ {
							mask[o] = true
						}
					}
					for i := range b.data {
						if b.data[i] != tg.data[i] && !mask[i] {
							t.Fatalf("delta %s(deleted=%v)->%s misses byte %d", b.name, b.deleted, tg.name, i)
						}
					}
					if !b.deleted {
						td, err := TableDelta(img, b.name, tg.name, 0, testDisk)
						if err != nil {
							t.Fatal(err)
						}
						for _, r := range td {
							for o := r.Offset; o < r.Offset+r.Length; o += 512 {
								if !mask[o] {
									t.Fatalf("table delta %s->%s at %d outside the bitmap delta %v", b.name, tg.name, o, d)
								}
							}
						}
					}
					checked++
				}
				// The snapshot reads back as taken.
				got, err := readSnapshot(img, tg.name)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, tg.data) {
					t.Fatalf("snapshot %s content differs", tg.name)
				}
			}
			t.Logf("%d snapshots, %d deltas checked", len(snaps), checked)
		})
	}
}

func readSnapshot(img *qcow2.Image, name string) ([]byte, error) {
	v, err := openView(img, name)
	if err != nil {
		return nil, err
	}
	defer v.Close()
	p := make([]byte, v.Size())
	_, err = v.ReadAt(p, 0)
	return p, err
}

// TestBackupRoundTrip: a full backup of S1 from Allocated, then
// incrementals from Delta applied to a copy; the copy equals each snapshot.
func TestBackupRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	img := newImage(t, testDisk)
	backup := make([]byte, testDisk)
	var prev *snap
	for i := 1; i <= 5; i++ {
		for w := 0; w < 10; w++ {
			off := rng.Int63n(testDisk - 4096)
			p := make([]byte, 1+rng.Intn(4096))
			rng.Read(p)
			if _, err := img.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
		}
		s := &snap{name: fmt.Sprintf("s%d", i), seq: uint64(i)}
		if _, err := Take(img, s.name, s.seq); err != nil {
			t.Fatal(err)
		}
		var rs []Range
		var err error
		if prev == nil {
			rs, err = Allocated(img, s.name, 0, testDisk)
		} else {
			rs, err = Delta(img, prev.seq, s.seq, 0, testDisk)
			// The base goes before the next delta is asked: deltas
			// from a deleted base must stay exact.
			if err == nil {
				err = Delete(img, prev.name, prev.seq)
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		want, err := readSnapshot(img, s.name)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			copy(backup[r.Offset:r.Offset+r.Length], want[r.Offset:r.Offset+r.Length])
		}
		if !bytes.Equal(backup, want) {
			t.Fatalf("backup after %s differs from the snapshot", s.name)
		}
		prev = s
	}
}

func TestDeltaErrors(t *testing.T) {
	img := newImage(t, testDisk)
	if _, err := Take(img, "a", 10); err != nil {
		t.Fatal(err)
	}
	if _, err := Take(img, "b", 5); !errors.Is(err, ErrInvalid) {
		t.Fatalf("older sequence: %v, want ErrInvalid", err)
	}
	if _, err := Take(img, "b", 20); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name         string
		base, target uint64
		want         error
	}{
		{"reversed", 20, 10, ErrInvalid},
		{"same", 10, 10, ErrInvalid},
		{"before tracking", 3, 20, ErrUntrusted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Delta(img, tc.base, tc.target, 0, testDisk); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := Allocated(img, "nope", 0, 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown snapshot: %v", err)
	}
	if _, err := Allocated(img, "a", testDisk+1, 1); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("beyond end: %v", err)
	}
	// Idempotent take.
	if _, err := Take(img, "b", 30); err != nil {
		t.Fatal(err)
	}
	if n := len(img.Snapshots()); n != 2 {
		t.Fatalf("%d snapshots after a repeated take, want 2", n)
	}
}

// TestTakeRetryAfterBitmapOnly: a Take interrupted after its bitmap was
// added (the caller's record says which sequence) completes on retry, and
// the writes in between are in the delta.
func TestTakeRetryAfterBitmapOnly(t *testing.T) {
	img := newImage(t, testDisk)
	if _, err := Take(img, "a", 1); err != nil {
		t.Fatal(err)
	}
	if err := img.AddBitmap(BitmapName(2), qcow2.BitmapOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte{1}, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := Take(img, "b", 2); err != nil {
		t.Fatalf("retry: %v", err)
	}
	d, err := Delta(img, 1, 2, 0, testDisk)
	if err != nil || !covered(d, 1<<20) {
		t.Fatalf("delta %v, %v", d, err)
	}
	if _, err := Take(img, "c", 1); !errors.Is(err, ErrInvalid) {
		t.Fatalf("older sequence: %v", err)
	}
}
