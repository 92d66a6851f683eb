package qcow2

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// createCase is one set of creation options exercised by the write tests.
type createCase struct {
	name string
	opts CreateOptions
}

func createCases() []createCase {
	var cs []createCase
	for _, c := range []int64{512, 4096, 65536, 2 << 20} {
		cs = append(cs, createCase{fmt.Sprint("cluster_", c), CreateOptions{ClusterSize: c}})
	}
	for _, rb := range []int{1, 2, 4, 8, 32, 64} {
		cs = append(cs, createCase{fmt.Sprint("refcount_bits_", rb), CreateOptions{RefcountBits: rb, ClusterSize: 4096}})
	}
	cs = append(cs,
		createCase{"v2", CreateOptions{Version: 2}},
		createCase{"v2_512", CreateOptions{Version: 2, ClusterSize: 512}},
		createCase{"lazy_refcounts", CreateOptions{LazyRefcounts: true}},
		createCase{"extended_l2", CreateOptions{ExtendedL2: true}},
		createCase{"extended_l2_16k", CreateOptions{ExtendedL2: true, ClusterSize: 16384}},
		createCase{"zstd", CreateOptions{CompressionType: "zstd"}},
		createCase{"prealloc_metadata", CreateOptions{Preallocation: PreallocMetadata}},
		createCase{"prealloc_falloc", CreateOptions{Preallocation: PreallocFalloc, ClusterSize: 4096}},
		createCase{"prealloc_full", CreateOptions{Preallocation: PreallocFull}},
	)
	return cs
}

// workload applies a seeded random mix of writes, zero writes and discards
// to img and to the reference byte slice, from several goroutines working
// on disjoint stripes (so the reference stays exact).
func workload(t *testing.T, img *Image, ref []byte, seed uint64, writers, ops int) {
	t.Helper()
	size := int64(len(ref))
	stripe := size / int64(writers)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			lo := int64(w) * stripe
			for i := 0; i < ops; i++ {
				off := lo + r.Int64N(stripe)
				n := min(r.Int64N(200_000)+1, lo+stripe-off)
				switch k := r.IntN(10); {
				case k < 6:
					buf := make([]byte, n)
					for j := range buf {
						buf[j] = byte(r.IntN(255) + 1)
					}
					if _, err := img.WriteAt(buf, off); err != nil {
						errs <- fmt.Errorf("WriteAt(%d, %d): %w", off, n, err)
						return
					}
					copy(ref[off:], buf)
				case k < 8:
					if err := img.WriteZeroes(off, n, ZeroMayUnmap); err != nil {
						errs <- fmt.Errorf("WriteZeroes(%d, %d): %w", off, n, err)
						return
					}
					clear(ref[off : off+n])
				case k < 9:
					if err := img.Discard(off, n); err != nil {
						errs <- fmt.Errorf("Discard(%d, %d): %w", off, n, err)
						return
					}
					// Discarded whole clusters read as zeroes (v3) or as the
					// backing file (v2); read back to keep the reference.
					got := make([]byte, n)
					if _, err := img.ReadAt(got, off); err != nil {
						errs <- err
						return
					}
					copy(ref[off:], got)
				default:
					if err := img.Flush(); err != nil {
						errs <- err
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func checkClean(t *testing.T, path string) {
	t.Helper()
	r, out := qemuCheck(t, path)
	if r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
		t.Fatalf("qemu-img check: %s", out)
	}
}

func compareWithRaw(t *testing.T, path string, ref []byte) {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "ref.raw")
	if err := os.WriteFile(raw, ref, 0o644); err != nil {
		t.Fatal(err)
	}
	qemu(t, "qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", path, raw)
	if got := ourRaw(t, path); !bytes.Equal(got, ref) {
		t.Fatal("our read-back differs from the reference")
	}
}

// TestWriteWorkloads: images created and written by us under concurrent
// random workloads pass qemu-img check (0 errors, 0 leaks) and compare
// identical to a reference raw file, for every create option.
func TestWriteWorkloads(t *testing.T) {
	for i, c := range createCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			p := filepath.Join(t.TempDir(), "img.qcow2")
			o := c.opts
			o.Size = 6<<20 + 3*512
			img, err := Create(p, o)
			if err != nil {
				t.Fatal(err)
			}
			ref := make([]byte, o.Size)
			workload(t, img, ref, uint64(i), 4, 40)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			checkClean(t, p)
			compareWithRaw(t, p, ref)
		})
	}
}

// TestWriteOverSnapshotsAndBacking writes into images whose clusters are
// shared with qemu-made internal snapshots (COW, COPIED flags) and images
// over backing files (partial-cluster COW from the backing file).
func TestWriteOverSnapshotsAndBacking(t *testing.T) {
	cases := []struct {
		name    string
		opts    string
		backing bool
		snap    bool
	}{
		{"snapshot", "cluster_size=4k", false, true},
		{"snapshot_extl2", "extended_l2=on,cluster_size=16k", false, true},
		{"snapshot_v2", "compat=0.10,cluster_size=4k", false, true},
		{"snapshot_lazy", "lazy_refcounts=on", false, true},
		{"backing", "cluster_size=4k", true, false},
		{"backing_extl2", "extended_l2=on", true, false},
		{"backing_v2", "compat=0.10", true, false},
		{"backing_snapshot_zstd", "compression_type=zstd,cluster_size=8k", true, true},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			size := int64(4 << 20)
			args := []string{"create", "-q", "-f", "qcow2", "-o", c.opts}
			if c.backing {
				b := filepath.Join(dir, "base.qcow2")
				qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", b, fmt.Sprint(size))
				qemu(t, "qemu-io", "-c", "write -P 0x5a 0 3M", "-c", "write -c -P 0x5b 3M 64k", b)
				args = append(args, "-b", "base.qcow2", "-F", "qcow2")
			}
			qemu(t, "qemu-img", append(args, p, fmt.Sprint(size))...)
			qemu(t, "qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -c -P 0x12 2M 64k", "-c", "write -P 0x13 1536k 100k", p)
			var snapRaw []byte
			if c.snap {
				qemu(t, "qemu-img", "snapshot", "-c", "s1", p)
				snapRaw = qemuSnapshotRaw(t, p, "s1")
			}
			ref := ourRaw(t, p)
			img, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			workload(t, img, ref, uint64(100+i), 3, 30)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			checkClean(t, p)
			if got := qemuRaw(t, p); !bytes.Equal(got, ref) {
				t.Fatal("qemu reads different active data than we wrote")
			}
			if c.snap {
				if got := qemuSnapshotRaw(t, p, "s1"); !bytes.Equal(got, snapRaw) {
					t.Fatal("snapshot contents changed")
				}
			}
		})
	}
}

func qemuSnapshotRaw(t *testing.T, path, snap string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "snap.raw")
	qemu(t, "qemu-img", "convert", "-U", "-l", "snapshot.name="+snap, "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestWriteCompressed: compressed clusters we write read back in qemu and
// pass its check.
func TestWriteCompressed(t *testing.T) {
	for _, ct := range []string{"zlib", "zstd"} {
		for _, cs := range []int64{4096, 65536, -32768} {
			extL2 := cs < 0 // extended L2: compressed clusters have an empty bitmap
			cs := max(cs, -cs)
			t.Run(fmt.Sprint(ct, "_", cs, "_extl2_", extL2), func(t *testing.T) {
				p := filepath.Join(t.TempDir(), "c.qcow2")
				size := 16*cs + 512
				img, err := Create(p, CreateOptions{Size: size, ClusterSize: cs, CompressionType: ct, ExtendedL2: extL2})
				if err != nil {
					t.Fatal(err)
				}
				ref := make([]byte, size)
				r := rand.New(rand.NewPCG(1, 2))
				for i := range ref {
					if i%3 == 0 || (i/int(cs))%7 == 3 {
						ref[i] = byte(r.IntN(256)) // some clusters incompressible
					} else {
						ref[i] = byte(i / 100)
					}
				}
				if _, err := img.WriteCompressed(ref[:8*cs], 0); err != nil {
					t.Fatal(err)
				}
				if _, err := img.WriteCompressed(ref[8*cs:], 8*cs); err != nil {
					t.Fatal(err)
				}
				// Overwrite part of a compressed cluster: COW from compressed.
				copy(ref[cs+100:], []byte("overwrite"))
				if _, err := img.WriteAt(ref[cs+100:cs+109], cs+100); err != nil {
					t.Fatal(err)
				}
				if err := img.Close(); err != nil {
					t.Fatal(err)
				}
				checkClean(t, p)
				compareWithRaw(t, p, ref)
			})
		}
	}
}
