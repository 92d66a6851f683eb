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
