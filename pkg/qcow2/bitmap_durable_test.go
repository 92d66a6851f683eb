package qcow2

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/tests/child"
)

// durableWorkload writes, zeroes, discards and flushes at random from
// several goroutines.
func durableWorkload(t *testing.T, img *Image, seed int64, ops int) {
	t.Helper()
	size := img.Size()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed + int64(g)))
			buf := make([]byte, 64<<10)
			for i := 0; i < ops; i++ {
				// Clustered around a few hot spots, so that units are
				// revisited, plus far random ones.
				off := r.Int63n(size) &^ 511
				if r.Intn(3) > 0 {
					off = (int64(r.Intn(8))*size/8 + r.Int63n(8<<20)) &^ 511
				}
				n := min(int64(512*(1+r.Intn(len(buf)/512))), size-off)
				var err error
				switch r.Intn(16) {
				case 15:
					// A guest flush: the tables reach the disk, so the
					// crash images see the data of earlier writes, and
					// later writes to those clusters go in place.
					err = img.Flush()
				case 0:
					err = img.WriteZeroes(off, n, ZeroMayUnmap)
				case 1:
					err = img.Discard(off, n)
				default:
					r.Read(buf[:n])
					_, err = img.WriteAt(buf[:n], off)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// contentAt records the guest contents of img, granule by granule, where
// it holds data (elsewhere it reads as zeroes).
func contentAt(t *testing.T, img *Image, g int64) map[int64][]byte {
	t.Helper()
	out := map[int64][]byte{}
	for _, off := range dataGranules(t, img, g) {
		b := make([]byte, g)
		if _, err := img.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		out[off] = b
	}
	return out
}

// dataGranules lists the granules of img that hold data.
func dataGranules(t *testing.T, img *Image, g int64) []int64 {
	t.Helper()
	es, err := img.BlockStatus(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	var out []int64
	for _, e := range es {
		if !e.Data || e.Zero {
			continue
		}
		for off := alignDown(e.Start, g); off < e.Start+e.Length; off += g {
			if len(out) == 0 || out[len(out)-1] != off {
				out = append(out, off)
			}
		}
	}
	return out
}

// assertBitmapCovers checks that bitmap cbt of the image at path is
// consistent and marks every granule whose contents differ from ref (the
// contents when the bitmap started).
func assertBitmapCovers(t *testing.T, path string, ref map[int64][]byte) {
	t.Helper()
	img, err := Open(path, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Fatalf("open %s: %v", filepath.Base(path), err)
	}
	defer img.Close()
	var st BitmapStatus
	for _, b := range img.Bitmaps() {
		if b.Name == "cbt" {
			st = b
		}
	}
	if st.Name == "" || st.Inconsistent {
		t.Fatalf("%s: bitmap cbt is %+v, want consistent", filepath.Base(path), st)
	}
	ext, err := img.BitmapExtents("cbt", 0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	dirty := func(off int64) bool {
		for _, e := range ext {
			if off >= e.Offset && off < e.Offset+e.Length {
				return e.Dirty
			}
		}
		return false
	}
	g := st.Granularity
	check := map[int64]bool{}
	for off := range ref {
		check[off] = true
	}
	for _, off := range dataGranules(t, img, g) {
		check[off] = true
	}
	got, zero := make([]byte, g), make([]byte, g)
	for off := range check {
		if _, err := img.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		want := ref[off]
		if want == nil {
			want = zero
		}
		if !bytes.Equal(got, want) && !dirty(off) {
			t.Fatalf("%s: granule at %d changed since the bitmap started, but bitmap cbt is clean there", filepath.Base(path), off)
		}
	}
}

// TestCrashConsistentBitmapsPowerLoss builds the file a power loss would
// leave at random moments of a concurrent write workload (all unsynced
// writes kept except the bitmap's own) and checks the bitmap, left in_use,
// loads as consistent and covers every changed granule. With a snapshot
// taken with the bitmap (the snapshotter's checkpoint), old clusters are
// shared and written by copy; without, they are written in place, whose
// data is on disk without any table update.
func TestCrashConsistentBitmapsPowerLoss(t *testing.T) {
	for _, tc := range []struct {
		cs       int64
		snapshot bool
	}{{4096, false}, {65536, false}, {65536, true}} {
		cs := tc.cs
		t.Run(fmt.Sprintf("cluster%d/snapshot=%v", cs, tc.snapshot), func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "disk.qcow2")
			img, err := Create(path, CreateOptions{Size: 4 << 30, ClusterSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			// Crash points: random, favouring moments with unsynced writes
			// (where an ordering bug would show), at most 25, before writes
			// only.
			r := rand.New(rand.NewSource(cs))
			crashes := 0
			crashAt := func(op powerLossOp) bool {
				if op.write && crashes < 25 && op.unsynced > 0 && r.Intn(8) == 0 {
					crashes++
					return true
				}
				return false
			}
			var pf *powerLossFile
			img, err = Open(path, OpenOptions{CrashConsistentBitmaps: true, wrapFile: func(f *os.File) imageFile {
				pf = &powerLossFile{File: f, drop: dropBitmapClusters, dir: dir}
				return pf
			}})
			if err != nil {
				t.Fatal(err)
			}
			// Some data before the checkpoint, then the checkpoint as the
			// snapshotter takes it: bitmap first, then the snapshot.
			durableWorkload(t, img, cs, 20)
			if err := img.Flush(); err != nil { // what a checkpoint starts from
				t.Fatal(err)
			}
			if err := img.AddBitmap("cbt", BitmapOptions{Granularity: 64 << 10}); err != nil {
				t.Fatal(err)
			}
			if tc.snapshot {
				if _, err := img.CreateSnapshot("base"); err != nil {
					t.Fatal(err)
				}
			}
			ref := contentAt(t, img, 64<<10)
			pf.mu.Lock()
			start := pf.writes
			pf.crashAt = crashAt
			pf.mu.Unlock()
			durableWorkload(t, img, cs+1, 100)
			pf.mu.Lock()
			images, perr := pf.crashes, pf.err
			pf.crashAt = nil
			pf.mu.Unlock()
			if perr != nil {
				t.Fatal(perr)
			}
			if len(images) < 10 {
				t.Fatalf("only %d crash points reached in %d writes", len(images), pf.writes-start)
			}
			for _, c := range images {
				assertBitmapCovers(t, c, ref)
			}
			// A clean close stores the exact bits and drops the marker.
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			assertBitmapCovers(t, path, ref)
			h := readHeaderForTest(t, path)
			if h.Autoclear&AutoclearCrashConsistentBitmaps != 0 {
				t.Fatalf("autoclear %#x after a clean close still has the crash-consistent marker", h.Autoclear)
			}
		})
	}
}

// dirtyRanges lists bitmap name's dirty extents as [offset, length) pairs.
func dirtyRanges(t *testing.T, img *Image, name string) [][2]int64 {
	t.Helper()
	ext, err := img.BitmapExtents(name, 0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	var out [][2]int64
	for _, e := range ext {
		if e.Dirty {
			out = append(out, [2]int64{e.Offset, e.Length})
		}
	}
	return out
}

// A crash-consistent writer killed with SIGKILL leaves its bitmap in_use
// but trusted: on disk it covers every write at 1 MiB units (a sequential
// run 16 units ahead), qemu-img check finds no corruption, and a clean
// close stores exact bits again. Once qemu writes the image, the marker is
// gone and the in_use bitmap is inconsistent, as qemu itself treats it.
func TestCrashConsistentBitmapsAfterKill(t *testing.T) {
	if p := os.Getenv("QCOW2_DURABLE_CHILD"); p != "" {
		img, err := Open(p, OpenOptions{CrashConsistentBitmaps: true})
		if err != nil {
			fmt.Println("child:", err)
			os.Exit(1)
		}
		buf := make([]byte, 4096)
		// Isolated writes at 0 and 10 MiB + 4 KiB, a sequential run
		// from 32 MiB over two units, and a zeroing at 60 MiB.
		for _, off := range []int64{0, 10<<20 + 4096, 32 << 20, 32<<20 + 1<<20} {
			if _, err := img.WriteAt(buf, off); err != nil {
				fmt.Println("child:", err)
				os.Exit(1)
			}
		}
		if err := img.WriteZeroes(60<<20, 4096, 0); err != nil {
			fmt.Println("child:", err)
			os.Exit(1)
		}
		fmt.Println("written")
		time.Sleep(time.Hour)
	}
	p := filepath.Join(t.TempDir(), "k.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "128M")
	qemu(t, "qemu-img", "bitmap", "--add", p, "cbt")

	cmd, line := child.Start(t, "TestCrashConsistentBitmapsAfterKill", "QCOW2_DURABLE_CHILD="+p)
	if line != "written" {
		t.Fatalf("child: %q", line)
	}
	child.Kill(cmd)

	if qb := qemuBitmaps(t, p); !reflect.DeepEqual(qb, []qemuBitmapInfo{{"cbt", 65536, []string{"in-use", "auto"}}}) {
		t.Fatalf("qemu-img info after kill: %+v", qb)
	}
	// Leaks are what any qcow2 writer killed before a flush leaves (its
	// newest allocations); anything else would be our fault.
	if r, out := qemuCheck(t, p); r.Corruptions != 0 || r.CheckErrors != 0 {
		t.Fatalf("qemu-img check after kill: %+v\n%s", r, out)
	}
	qemuCopy := filepath.Join(t.TempDir(), "q.qcow2")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(qemuCopy, data, 0o644); err != nil {
		t.Fatal(err)
	}

	const mib = 1 << 20
	coarse := [][2]int64{{0, mib}, {10 * mib, mib}, {32 * mib, 17 * mib}, {60 * mib, mib}}
	img, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := dirtyRanges(t, img, "cbt"); !reflect.DeepEqual(got, coarse) {
		t.Fatalf("bitmap after kill = %v, want %v", got, coarse)
	}
	img.Close()

	// Reopened crash-consistent: trusted, tracking on; a clean close
	// stores the exact bits of this session on top of the crash's.
	img, err = Open(p, OpenOptions{CrashConsistentBitmaps: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(make([]byte, 512), 100*mib); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if qb := qemuBitmaps(t, p); !reflect.DeepEqual(qb, []qemuBitmapInfo{{"cbt", 65536, []string{"auto"}}}) {
		t.Fatalf("qemu-img info after a clean close: %+v", qb)
	}
	img, err = Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := dirtyRanges(t, img, "cbt"), append(coarse, [2]int64{100 * mib, 65536}); !reflect.DeepEqual(got, want) {
		t.Fatalf("bitmap after a clean close = %v, want %v", got, want)
	}
	img.Close()

	// qemu writes the crashed copy: it clears our autoclear bit, and the
	// in_use bitmap is inconsistent from then on.
	qemu(t, "qemu-io", "-c", "write 64M 4k", qemuCopy)
	if h := readHeaderForTest(t, qemuCopy); h.Autoclear&AutoclearCrashConsistentBitmaps != 0 {
		t.Fatalf("qemu kept the crash-consistent marker: autoclear %#x", h.Autoclear)
	}
	img, err = Open(qemuCopy, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if bs := img.Bitmaps(); len(bs) != 1 || !bs[0].Inconsistent {
		t.Fatalf("bitmaps after qemu wrote the crashed image: %+v", bs)
	}
}
