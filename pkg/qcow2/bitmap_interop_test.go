package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/tests/child"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// qemuDirtyMap is what qemu exposes for a bitmap: qemu-nbd -B NAME serving
// the image read-only, read with nbdinfo --map=qemu:dirty-bitmap:NAME.
func qemuDirtyMap(t *testing.T, path, name string) []BitmapExtent {
	t.Helper()
	qemuNbd := peer.Require(t, "qemu-nbd")
	nbdinfo := peer.Require(t, "nbdinfo")
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	srv := exec.Command(qemuNbd, "-r", "-t", "-k", sock, "-f", "qcow2", "-B", name, path)
	var serr bytes.Buffer
	srv.Stderr = &serr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 200 {
			t.Fatalf("qemu-nbd did not start: %s", serr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The socket file appears at bind(); retry the short window before
	// qemu-nbd listens.
	var out []byte
	var err error
	for i := 0; i < 50; i++ {
		if out, err = exec.Command(nbdinfo, "--json", "--map=qemu:dirty-bitmap:"+name, "nbd+unix:///?socket="+sock).Output(); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("nbdinfo: %v (qemu-nbd: %s)", err, serr.String())
	}
	var raw []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int   `json:"type"`
	}
	if err := json.Unmarshal(out, &raw); err != nil {
		t.Fatalf("nbdinfo output %q: %v", out, err)
	}
	var ext []BitmapExtent
	for _, r := range raw {
		// nbdinfo may split a run at request boundaries: join them.
		d := r.Type&1 != 0
		if n := len(ext); n > 0 && ext[n-1].Dirty == d && ext[n-1].Offset+ext[n-1].Length == r.Offset {
			ext[n-1].Length += r.Length
			continue
		}
		ext = append(ext, BitmapExtent{Offset: r.Offset, Length: r.Length, Dirty: d})
	}
	return ext
}

// sameAsQemu compares our extents with qemu's over qemu's export, which
// qemu-nbd rounds down to 512 bytes.
func sameAsQemu(t *testing.T, img *Image, name string, q []BitmapExtent) bool {
	t.Helper()
	var n int64
	for _, e := range q {
		n += e.Length
	}
	ours, err := img.BitmapExtents(name, 0, n)
	if err != nil {
		t.Fatalf("BitmapExtents(%q): %v", name, err)
	}
	if !reflect.DeepEqual(ours, q) {
		t.Errorf("bitmap %s:\n qemu %v\n ours %v", name, q, ours)
		return false
	}
	return true
}

func ourDirtyMap(t *testing.T, img *Image, name string) []BitmapExtent {
	t.Helper()
	ext, err := img.BitmapExtents(name, 0, img.Size())
	if err != nil {
		t.Fatalf("BitmapExtents(%q): %v", name, err)
	}
	return ext
}

func qemuCheckClean(t *testing.T, path string) {
	t.Helper()
	p := peer.Require(t, "qemu-img")
	out, err := exec.Command(p, "check", path).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "No errors were found") {
		t.Fatalf("qemu-img check %s: %v\n%s", path, err, out)
	}
}

type qemuBitmapInfo struct {
	Name        string   `json:"name"`
	Granularity int64    `json:"granularity"`
	Flags       []string `json:"flags"`
}

func qemuBitmaps(t *testing.T, path string) []qemuBitmapInfo {
	t.Helper()
	var info struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps []qemuBitmapInfo `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(qemu(t, "qemu-img", "info", "-U", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return info.FormatSpecific.Data.Bitmaps
}

// Bitmaps made and updated by qemu read by us as qemu exposes them.
func TestBitmapsFromQemu(t *testing.T) {
	dir := t.TempDir()
	for _, cs := range []string{"512", "65536"} {
		t.Run("cluster"+cs, func(t *testing.T) {
			p := filepath.Join(dir, "q"+cs+".qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size="+cs, p, "67108865")
			qemu(t, "qemu-img", "bitmap", "--add", "-g", "512", p, "fine")
			qemu(t, "qemu-img", "bitmap", "--add", p, "default")
			qemu(t, "qemu-img", "bitmap", "--add", "-g", "2M", p, "coarse")
			qemu(t, "qemu-img", "bitmap", "--add", "--disable", p, "frozen")
			qemu(t, "qemu-io", "-c", "write 1000 3000", "-c", "write 65535 2", "-c", "write -z 8M 1M",
				"-c", "discard 20M 64k", "-c", "write 67108864 1", "-c", "write 33554431 131073", p)
			qemu(t, "qemu-img", "bitmap", "--enable", p, "frozen")
			qemu(t, "qemu-io", "-c", "write 40M 1", p)
			qemu(t, "qemu-img", "bitmap", "--disable", p, "frozen")
			qemu(t, "qemu-io", "-c", "write 50M 1", p)

			img, err := Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			got := img.Bitmaps()
			want := []BitmapStatus{
				{Name: "fine", Granularity: 512, Enabled: true, Auto: true},
				{Name: "default", Granularity: min(max(mustAtoi(cs), 4096), 65536), Enabled: true, Auto: true},
				{Name: "coarse", Granularity: 2 << 20, Enabled: true, Auto: true},
				{Name: "frozen", Granularity: min(max(mustAtoi(cs), 4096), 65536)},
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("Bitmaps() = %+v\nwant %+v", got, want)
			}
			for _, b := range want {
				sameAsQemu(t, img, b.Name, qemuDirtyMap(t, p, b.Name))
			}
		})
	}
}

func clipExtents(es []BitmapExtent, n int64) []BitmapExtent {
	var out []BitmapExtent
	for _, e := range es {
		if e.Offset >= n {
			break
		}
		e.Length = min(e.Length, n-e.Offset)
		out = append(out, e)
	}
	return out
}

func mustAtoi(s string) int64 {
	var n int64
	fmt.Sscan(s, &n)
	return n
}

// Bitmaps made and updated by us read by qemu the same way.
func TestBitmapsToQemu(t *testing.T) {
	for _, tc := range []struct {
		name string
		cs   int64
		size int64
	}{{"c64k", 65536, 64<<20 + 7}, {"c4k", 4096, 8 << 20}, {"c512", 512, 4 << 20}, {"c2M", 2 << 20, 300 << 20}} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "ours.qcow2")
			img, err := Create(p, CreateOptions{Size: tc.size, ClusterSize: tc.cs})
			if err != nil {
				t.Fatal(err)
			}
			for _, b := range []struct {
				name string
				o    BitmapOptions
			}{{"b512", BitmapOptions{Granularity: 512}}, {"b64k", BitmapOptions{}}, {"b1m", BitmapOptions{Granularity: 1 << 20}}, {"off", BitmapOptions{Disabled: true}}} {
				if err := img.AddBitmap(b.name, b.o); err != nil {
					t.Fatal(err)
				}
			}
			r := rand.New(rand.NewPCG(uint64(tc.cs), 1))
			buf := make([]byte, 300000)
			for i := 0; i < 40; i++ {
				off := r.Int64N(tc.size)
				n := min(r.Int64N(int64(len(buf)))+1, tc.size-off)
				if _, err := img.WriteAt(buf[:n], off); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := img.WriteAt([]byte{1}, tc.size-1); err != nil {
				t.Fatal(err)
			}
			want := map[string][]BitmapExtent{}
			for _, b := range img.Bitmaps() {
				want[b.Name] = ourDirtyMap(t, img, b.Name)
			}
			if len(want["off"]) != 1 || want["off"][0].Dirty {
				t.Fatalf("disabled bitmap changed: %v", want["off"])
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheckClean(t, p)
			qb := qemuBitmaps(t, p)
			wantQ := []qemuBitmapInfo{{"b512", 512, []string{"auto"}}, {"b64k", 65536, []string{"auto"}}, {"b1m", 1 << 20, []string{"auto"}}, {"off", 65536, []string{}}}
			if tc.cs < 65536 {
				wantQ[1].Granularity, wantQ[3].Granularity = 4096, 4096
			}
			if !reflect.DeepEqual(qb, wantQ) {
				t.Fatalf("qemu-img info bitmaps %+v, want %+v", qb, wantQ)
			}
			for name, w := range want {
				q := qemuDirtyMap(t, p, name)
				var n int64
				for _, e := range q {
					n += e.Length
				}
				if !reflect.DeepEqual(q, clipExtents(w, n)) {
					t.Errorf("bitmap %s:\n qemu %v\n ours %v", name, q, w)
				}
			}
			// And qemu keeps updating what we stored.
			qemu(t, "qemu-io", "-c", "write 0 1", p)
			img, err = Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			for _, b := range []string{"b512", "b64k", "b1m", "off"} {
				sameAsQemu(t, img, b, qemuDirtyMap(t, p, b))
			}
		})
	}
}

// A writer killed with SIGKILL leaves its enabled bitmaps in_use: on reopen
// they are reported inconsistent, refused for use, and only removable;
// disabled bitmaps stay consistent.
func TestBitmapsInUseAfterKill(t *testing.T) {
	if os.Getenv("QCOW2_BITMAP_CHILD") != "" {
		img, err := Open(os.Getenv("QCOW2_BITMAP_CHILD"), OpenOptions{})
		if err != nil {
			fmt.Println("child:", err)
			os.Exit(1)
		}
		if _, err := img.WriteAt([]byte("x"), 12345); err != nil {
			fmt.Println("child:", err)
			os.Exit(1)
		}
		fmt.Println("written")
		time.Sleep(time.Hour)
	}
	p := filepath.Join(t.TempDir(), "k.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
	qemu(t, "qemu-img", "bitmap", "--add", p, "live")
	qemu(t, "qemu-img", "bitmap", "--add", "--disable", p, "frozen")
	qemu(t, "qemu-io", "-c", "write 0 1", p)

	cmd, line := child.Start(t, "TestBitmapsInUseAfterKill", "QCOW2_BITMAP_CHILD="+p)
	if line != "written" {
		t.Fatalf("child: %q", line)
	}
	child.Kill(cmd)

	qb := qemuBitmaps(t, p)
	if !reflect.DeepEqual(qb, []qemuBitmapInfo{{"live", 65536, []string{"in-use", "auto"}}, {"frozen", 65536, []string{}}}) {
		t.Fatalf("qemu-img info after kill: %+v", qb)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	got := img.Bitmaps()
	want := []BitmapStatus{{Name: "live", Granularity: 65536, Enabled: true, Inconsistent: true, InUse: true, Auto: true}, {Name: "frozen", Granularity: 65536}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Bitmaps() = %+v, want %+v", got, want)
	}
	if _, err := img.BitmapExtents("live", 0, 1); !errors.Is(err, ErrBitmapInconsistent) {
		t.Fatalf("extents of an in-use bitmap: %v", err)
	}
	for name, op := range map[string]func() error{
		"clear":   func() error { return img.ClearBitmap("live") },
		"enable":  func() error { return img.EnableBitmap("live") },
		"merge":   func() error { return img.MergeBitmap("frozen", "live") },
		"mergeTo": func() error { return img.MergeBitmap("live", "frozen") },
	} {
		if err := op(); !errors.Is(err, ErrBitmapInconsistent) {
			t.Errorf("%s on inconsistent bitmap: %v", name, err)
		}
	}
	if ext := ourDirtyMap(t, img, "frozen"); len(ext) != 1 || ext[0].Dirty {
		t.Fatalf("frozen bitmap: %v", ext)
	}
	if err := img.RemoveBitmap("live"); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheckClean(t, p)
	if qb := qemuBitmaps(t, p); !reflect.DeepEqual(qb, []qemuBitmapInfo{{"frozen", 65536, []string{}}}) {
		t.Fatalf("after remove: %+v", qb)
	}
}

// Property: random writes over random bitmaps; every enabled bitmap covers
// exactly the touched ranges at its granularity, disabled bitmaps do not
// change, merges are unions — and all of it survives close and reopen.
func TestBitmapsProperty(t *testing.T) {
	for seed := uint64(1); seed <= 3; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 42))
			size := int64(8<<20) + r.Int64N(1<<20)
			p := filepath.Join(t.TempDir(), "p.qcow2")
			img, err := Create(p, CreateOptions{Size: size, ClusterSize: 4096})
			if err != nil {
				t.Fatal(err)
			}
			type mb struct {
				gran    uint
				enabled bool
				m       *naiveBitmap
			}
			models := map[string]*mb{}
			for i, g := range []uint{9, 12, 16, 20} {
				name := fmt.Sprintf("g%d", g)
				en := i != 2
				if err := img.AddBitmap(name, BitmapOptions{Granularity: 1 << g, Disabled: !en}); err != nil {
					t.Fatal(err)
				}
				models[name] = &mb{g, en, newNaive(uint64(size), g)}
			}
			buf := make([]byte, 200000)
			for step := 0; step < 60; step++ {
				switch k := r.IntN(12); {
				case k == 10 || k == 11:
					// Zero writes and discards mark the whole range asked
					// for, as in qemu, even the partial clusters a discard
					// leaves alone.
					off := r.Int64N(size)
					n := min(r.Int64N(3<<20)+1, size-off)
					if r.IntN(3) == 0 {
						n = min(r.Int64N(5000)+1, size-off) // often sub-cluster
					}
					mo, mn := off, n
					if k == 10 {
						if err := img.WriteZeroes(off, n, ZeroFlags(r.IntN(2))); err != nil {
							t.Fatal(err)
						}
					} else if err := img.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					for _, m := range models {
						if m.enabled {
							m.m.set(uint64(mo), uint64(mn))
						}
					}
				case k < 7:
					off := r.Int64N(size)
					n := min(r.Int64N(int64(len(buf)))+1, size-off)
					if _, err := img.WriteAt(buf[:n], off); err != nil {
						t.Fatal(err)
					}
					for _, m := range models {
						if m.enabled {
							m.m.set(uint64(off), uint64(n))
						}
					}
				case k == 7:
					name := fmt.Sprintf("g%d", []uint{9, 12, 16, 20}[r.IntN(4)])
					m := models[name]
					if m.enabled {
						if err := img.DisableBitmap(name); err != nil {
							t.Fatal(err)
						}
					} else if err := img.EnableBitmap(name); err != nil {
						t.Fatal(err)
					}
					m.enabled = !m.enabled
				case k == 8:
					dst := fmt.Sprintf("g%d", []uint{9, 12, 16, 20}[r.IntN(4)])
					src := fmt.Sprintf("g%d", []uint{9, 12, 16, 20}[r.IntN(4)])
					if err := img.MergeBitmap(dst, src); err != nil {
						t.Fatal(err)
					}
					for _, e := range models[src].m.extents(0, uint64(size)) {
						if e.Dirty {
							models[dst].m.set(uint64(e.Offset), uint64(e.Length))
						}
					}
				default:
					name := fmt.Sprintf("g%d", []uint{9, 12, 16, 20}[r.IntN(4)])
					if err := img.ClearBitmap(name); err != nil {
						t.Fatal(err)
					}
					models[name].m = newNaive(uint64(size), models[name].gran)
				}
			}
			check := func(img *Image, when string) {
				for name, m := range models {
					if got, want := ourDirtyMap(t, img, name), m.m.extents(0, uint64(size)); !reflect.DeepEqual(got, want) {
						t.Fatalf("%s: bitmap %s:\n got %v\nwant %v", when, name, got, want)
					}
				}
			}
			check(img, "open")
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheckClean(t, p)
			img, err = Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			check(img, "reopened")
			for _, b := range img.Bitmaps() {
				if b.Enabled != models[b.Name].enabled {
					t.Fatalf("bitmap %s enabled=%v, want %v", b.Name, b.Enabled, models[b.Name].enabled)
				}
			}
		})
	}
}

func TestBitmapAPIErrors(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "e.qcow2")
	img, err := Create(p, CreateOptions{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.AddBitmap("a", BitmapOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		err  error
		want error
	}{
		{"dup", img.AddBitmap("a", BitmapOptions{}), ErrBitmapExists},
		{"gran", img.AddBitmap("b", BitmapOptions{Granularity: 256}), ErrBitmapInvalid},
		{"name", img.AddBitmap(strings.Repeat("x", 1024), BitmapOptions{}), ErrBitmapInvalid},
		{"missing-remove", img.RemoveBitmap("zz"), ErrBitmapNotFound},
		{"missing-merge", img.MergeBitmap("a", "zz"), ErrBitmapNotFound},
	} {
		if !errors.Is(tc.err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, tc.err, tc.want)
		}
	}
	v2 := filepath.Join(dir, "v2.qcow2")
	img2, err := Create(v2, CreateOptions{Size: 1 << 20, Version: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer img2.Close()
	if err := img2.AddBitmap("a", BitmapOptions{}); !errors.Is(err, ErrBitmapInvalid) {
		t.Fatalf("v2 add: %v", err)
	}
}

// A program without bitmap support clears the autoclear bit when it writes:
// the bitmaps must then be dropped, never trusted.
func TestBitmapsAutoclearCleared(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
	qemu(t, "qemu-img", "bitmap", "--add", p, "b")
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var ac [8]byte
	if _, err := f.WriteAt(ac[:], 88); err != nil { // autoclear features = 0
		t.Fatal(err)
	}
	f.Close()
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if b := img.Bitmaps(); len(b) != 0 {
		t.Fatalf("bitmaps trusted after the autoclear bit was cleared: %+v", b)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if qb := qemuBitmaps(t, p); len(qb) != 0 {
		t.Fatalf("qemu still sees bitmaps: %+v", qb)
	}
}

// The resize hook pair, driven as Resize (issue 3) drives it: bitmaps
// follow the new size and qemu reads them afterwards.
func TestBitmapsResizeHooks(t *testing.T) {
	for _, tc := range []struct {
		name    string
		newSize int64
	}{{"grow", 40 << 20}, {"shrink", 5 << 20}} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "r.qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
			qemu(t, "qemu-img", "bitmap", "--add", "-g", "4k", p, "live")
			qemu(t, "qemu-img", "bitmap", "--add", "--disable", p, "frozen")
			qemu(t, "qemu-io", "-c", "write 0 1", "-c", "write 6M 1M", p)
			qemu(t, "qemu-img", "bitmap", "--merge", "live", p, "frozen")
			img, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			img.mu.Lock()
			err = img.bitmapsResizeCheck(tc.newSize)
			if err == nil {
				var b [8]byte
				binary.BigEndian.PutUint64(b[:], uint64(tc.newSize))
				_, err = img.f.WriteAt(b[:], hdrSize)
				img.hdr.Size, img.size = uint64(tc.newSize), tc.newSize
			}
			if err == nil {
				err = img.resizeBitmaps(tc.newSize)
			}
			img.mu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := img.WriteAt([]byte{1}, tc.newSize-1); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheckClean(t, p)
			img, err = Open(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			for _, b := range []string{"live", "frozen"} {
				sameAsQemu(t, img, b, qemuDirtyMap(t, p, b))
			}
			want := []BitmapExtent{{0, 4096, true}, {4096, 6<<20 - 4096, false}, {6 << 20, 1 << 20, true}, {7 << 20, tc.newSize - 7<<20 - 4096, false}, {tc.newSize - 4096, 4096, true}}
			if tc.newSize < 7<<20 {
				want = []BitmapExtent{{0, 4096, true}, {4096, tc.newSize - 8192, false}, {tc.newSize - 4096, 4096, true}}
			}
			if got := ourDirtyMap(t, img, "live"); !reflect.DeepEqual(got, want) {
				t.Fatalf("live after resize: %v\nwant %v", got, want)
			}
		})
	}
}

// BenchmarkImageBitmapExtents1TiB reads the dirty extents of a 64 KiB
// granularity bitmap over a 1 TiB image after 2000 scattered writes.
func BenchmarkImageBitmapExtents1TiB(b *testing.B) {
	p := filepath.Join(b.TempDir(), "tb.qcow2")
	img, err := Create(p, CreateOptions{Size: 1 << 40})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	if err := img.AddBitmap("cbt", BitmapOptions{}); err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(3, 3))
	buf := make([]byte, 4096)
	for i := 0; i < 2000; i++ {
		if _, err := img.WriteAt(buf, r.Int64N(1<<40-4096)); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ext, err := img.BitmapExtents("cbt", 0, 1<<40)
		if err != nil || len(ext) < 2000 {
			b.Fatalf("%d extents, %v", len(ext), err)
		}
	}
}

// Concurrent writers, extent readers and stores: under -race, and no write
// is missed.
func TestBitmapsConcurrent(t *testing.T) {
	const size = 32 << 20
	p := filepath.Join(t.TempDir(), "c.qcow2")
	img, err := Create(p, CreateOptions{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.AddBitmap("a", BitmapOptions{Granularity: 4096}); err != nil {
		t.Fatal(err)
	}
	if err := img.AddBitmap("b", BitmapOptions{Granularity: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	type rng struct{ off, n int64 }
	done := make(chan []rng)
	for w := 0; w < 4; w++ {
		go func(w int) {
			r := rand.New(rand.NewPCG(uint64(w), 9))
			buf := make([]byte, 70000)
			var mine []rng
			for i := 0; i < 50; i++ {
				off := r.Int64N(size - int64(len(buf)))
				n := r.Int64N(int64(len(buf))) + 1
				if _, err := img.WriteAt(buf[:n], off); err != nil {
					t.Error(err)
				}
				mine = append(mine, rng{off, n})
			}
			done <- mine
		}(w)
	}
	stop := make(chan struct{})
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := img.BitmapExtents("a", 0, size); err != nil {
				t.Error(err)
			}
			if err := img.StoreBitmaps(); err != nil {
				t.Error(err)
			}
		}
	}()
	m := newNaive(size, 12)
	for w := 0; w < 4; w++ {
		for _, x := range <-done {
			m.set(uint64(x.off), uint64(x.n))
		}
	}
	close(stop)
	<-readerDone
	if got, want := ourDirtyMap(t, img, "a"), m.extents(0, size); !reflect.DeepEqual(got, want) {
		t.Fatalf("concurrent tracking missed writes:\n got %v\nwant %v", got, want)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheckClean(t, p)
}

// The same writes, zero writes and discards (partial, unaligned, spanning
// clusters) done by qemu-io on one image and through our API on another
// leave the same bits in bitmaps of every granularity.
func TestBitmapTrackingSameAsQemu(t *testing.T) {
	dir := t.TempDir()
	q, o := filepath.Join(dir, "q.qcow2"), filepath.Join(dir, "o.qcow2")
	const size = 48 << 20
	grans := []string{"512", "4096", "65536", "1048576"}
	for _, p := range []string{q, o} {
		qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, fmt.Sprint(size))
		for _, g := range grans {
			qemu(t, "qemu-img", "bitmap", "--add", "-g", g, p, "g"+g)
		}
	}
	img, err := Open(o, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(11, 12))
	var cmds []string
	for i := 0; i < 40; i++ {
		off := r.Int64N(size - 1)
		n := min(r.Int64N(300000)+1, size-off)
		if i%3 == 0 {
			n = min(r.Int64N(700)+1, size-off)
		}
		switch i % 4 {
		case 0, 1:
			cmds = append(cmds, "-c", fmt.Sprintf("write %d %d", off, n))
			_, err = img.WriteAt(make([]byte, n), off)
		case 2:
			cmds = append(cmds, "-c", fmt.Sprintf("write -z %d %d", off, n))
			err = img.WriteZeroes(off, n, 0)
		case 3:
			cmds = append(cmds, "-c", fmt.Sprintf("discard %d %d", off, n))
			err = img.Discard(off, n)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemu(t, "qemu-io", append([]string{"-d", "unmap"}, append(cmds, q)...)...)
	img, err = Open(o, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for _, g := range grans {
		sameAsQemu(t, img, "g"+g, qemuDirtyMap(t, q, "g"+g))
	}
}

// BenchmarkWriteTracking is the cost of dirty tracking on the write path:
// 4 KiB random rewrites of allocated clusters with 0, 1 and 4 enabled
// bitmaps.
func BenchmarkWriteTracking(b *testing.B) {
	for _, nb := range []int{0, 1, 4} {
		b.Run(fmt.Sprintf("bitmaps=%d", nb), func(b *testing.B) {
			const size = 256 << 20
			p := filepath.Join(b.TempDir(), "w.qcow2")
			img, err := Create(p, CreateOptions{Size: size})
			if err != nil {
				b.Fatal(err)
			}
			defer img.Close()
			for i := 0; i < nb; i++ {
				if err := img.AddBitmap(fmt.Sprint("b", i), BitmapOptions{Granularity: 4096 << i}); err != nil {
					b.Fatal(err)
				}
			}
			buf := make([]byte, 1<<20)
			for off := int64(0); off < size; off += int64(len(buf)) {
				if _, err := img.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
			r := rand.New(rand.NewPCG(5, 5))
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := img.WriteAt(buf[:4096], r.Int64N(size/4096)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
