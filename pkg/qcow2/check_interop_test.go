package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// qemuCheck runs qemu-img check --output=json (with -r mode when given) and
// returns its exit code and report.
func qemuCheckJSON(t *testing.T, path string, repair string) (int, map[string]any) {
	t.Helper()
	args := []string{"check", "--output=json"}
	if repair != "" {
		args = append(args, "-r", repair)
	}
	cmd := exec.Command(peer.Require(t, "qemu-img"), append(args, path)...)
	var out bytes.Buffer
	cmd.Stdout = &out
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	_ = json.Unmarshal(out.Bytes(), &m)
	return code, m
}

// damageImage is a qemu-made image and a way to break it.
type damage struct {
	name string
	// patch breaks the image file; h gives the header fields it needs.
	patch func(t *testing.T, f *os.File, h rawHeader)
	// metadataAlias: the damage makes guest data alias metadata, so a
	// repair that fixes the metadata changes what that guest cluster
	// reads; bytes are compared everywhere else.
	metadataAlias bool
}

type rawHeader struct {
	clusterSize, l1Off, refTableOff int64
}

func readRawHeader(t *testing.T, f *os.File) rawHeader {
	var b [64]byte
	if _, err := f.ReadAt(b[:], 0); err != nil {
		t.Fatal(err)
	}
	return rawHeader{
		clusterSize: 1 << binary.BigEndian.Uint32(b[20:]),
		l1Off:       int64(binary.BigEndian.Uint64(b[40:])),
		refTableOff: int64(binary.BigEndian.Uint64(b[48:])),
	}
}

func get64(t *testing.T, f *os.File, off int64) uint64 {
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[:])
}

func put64(t *testing.T, f *os.File, off int64, v uint64) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// firstL2 is the offset of the active L2 table mapping guest offset 0.
func firstL2(t *testing.T, f *os.File, h rawHeader) int64 {
	return int64(get64(t, f, h.l1Off) & offsetMask)
}

// findL2Entry returns the index of the first entry of the L2 table at l2
// for which pred holds.
func findL2Entry(t *testing.T, f *os.File, l2 int64, h rawHeader, pred func(e uint64) bool) int64 {
	for i := int64(0); i < h.clusterSize/8; i++ {
		if pred(get64(t, f, l2+i*8)) {
			return i
		}
	}
	t.Fatal("no matching L2 entry")
	return -1
}

var damages = []damage{
	{name: "clean", patch: func(*testing.T, *os.File, rawHeader) {}},
	{name: "leak", patch: func(t *testing.T, f *os.File, h rawHeader) {
		// Drop the only reference to a cluster nobody else uses.
		l2 := firstL2(t, f, h)
		i := findL2Entry(t, f, l2, h, func(e uint64) bool { return e&oflagCopied != 0 && e&offsetMask != 0 })
		put64(t, f, l2+i*8, 0)
	}},
	{name: "refblock-zeroed", patch: func(t *testing.T, f *os.File, h rawHeader) {
		rb := int64(get64(t, f, h.refTableOff))
		if _, err := f.WriteAt(make([]byte, h.clusterSize), rb); err != nil {
			t.Fatal(err)
		}
	}},
	{name: "reftable-points-nowhere", patch: func(t *testing.T, f *os.File, h rawHeader) {
		put64(t, f, h.refTableOff, 1<<40)
	}},
	{name: "reftable-misaligned", patch: func(t *testing.T, f *os.File, h rawHeader) {
		put64(t, f, h.refTableOff, get64(t, f, h.refTableOff)+4096)
	}},
	{name: "l2-entry-past-eof", patch: func(t *testing.T, f *os.File, h rawHeader) {
		l2 := firstL2(t, f, h)
		i := findL2Entry(t, f, l2, h, func(e uint64) bool { return e&oflagCopied != 0 && e&offsetMask != 0 })
		put64(t, f, l2+i*8, oflagCopied|1<<36)
	}},
	{name: "l1-entry-past-eof", patch: func(t *testing.T, f *os.File, h rawHeader) {
		put64(t, f, h.l1Off, oflagCopied|1<<37)
	}},
	{name: "copied-cleared-data", patch: func(t *testing.T, f *os.File, h rawHeader) {
		l2 := firstL2(t, f, h)
		i := findL2Entry(t, f, l2, h, func(e uint64) bool { return e&oflagCopied != 0 && e&offsetMask != 0 })
		put64(t, f, l2+i*8, get64(t, f, l2+i*8)&^oflagCopied)
	}},
	{name: "copied-set-on-shared", patch: func(t *testing.T, f *os.File, h rawHeader) {
		// A cluster shared with the snapshot (refcount 2) claiming COPIED.
		l2 := firstL2(t, f, h)
		i := findL2Entry(t, f, l2, h, func(e uint64) bool {
			return e&oflagCopied == 0 && e&offsetMask != 0 && e&oflagCompressed == 0
		})
		put64(t, f, l2+i*8, get64(t, f, l2+i*8)|oflagCopied)
	}},
	{name: "copied-cleared-l1", patch: func(t *testing.T, f *os.File, h rawHeader) {
		put64(t, f, h.l1Off, get64(t, f, h.l1Off)&^oflagCopied)
	}},
	{name: "overlapping-data", patch: func(t *testing.T, f *os.File, h rawHeader) {
		l2 := firstL2(t, f, h)
		i := findL2Entry(t, f, l2, h, func(e uint64) bool { return e&oflagCopied != 0 && e&offsetMask != 0 })
		j := findL2Entry(t, f, l2, h, func(e uint64) bool { return e == 0 })
		put64(t, f, l2+j*8, get64(t, f, l2+i*8))
	}},
	{name: "data-overlaps-l2", metadataAlias: true, patch: func(t *testing.T, f *os.File, h rawHeader) {
		l2 := firstL2(t, f, h)
		j := findL2Entry(t, f, l2, h, func(e uint64) bool { return e == 0 })
		put64(t, f, l2+j*8, oflagCopied|uint64(l2))
	}},
}

// makeCheckBase builds the qemu-made image every damage starts from: data,
// an internal snapshot, writes after it (so shared and unshared clusters
// and tables exist), a compressed cluster and persistent bitmaps.
func makeCheckBase(t *testing.T, dir string) string {
	p := filepath.Join(dir, "base.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
	qemu(t, "qemu-io", "-c", "write -P 0xa1 0 1M", "-c", "write -P 0xa2 8M 256k", "-c", "write -P 0xa3 40M 64k", p)
	qemu(t, "qemu-img", "snapshot", "-c", "s1", p)
	qemu(t, "qemu-img", "bitmap", "--add", p, "cbt")
	qemu(t, "qemu-io", "-c", "write -P 0xb1 64k 128k", "-c", "write -c -P 0xb2 2M 64k", "-c", "write -P 0xb3 50M 64k", p)
	return p
}

func copyFile(t *testing.T, src, dst string) {
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// Damaged images: our check reaches qemu-img check's verdict; after our
// repair qemu-img check is clean and every readable byte is unchanged.
func TestCheckDamagedImagesAgainstQemu(t *testing.T) {
	dir := t.TempDir()
	base := makeCheckBase(t, dir)
	for _, d := range damages {
		t.Run(d.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), d.name+".qcow2")
			copyFile(t, base, p)
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			d.patch(t, f, readRawHeader(t, f))
			f.Close()

			qcode, qrep := qemuCheckJSON(t, p, "")
			img, err := OpenForCheck(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("OpenForCheck: %v", err)
			}
			res, err := img.Check(RepairNone)
			img.Close()
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if res.ExitCode() != qcode {
				t.Fatalf("verdict %d (corruptions %d leaks %d), qemu-img check says %d (%v)\n%v", res.ExitCode(), res.Corruptions, res.Leaks, qcode, qrep, res.Messages)
			}
			t.Logf("qemu: %v; ours: corruptions=%d leaks=%d", qrep, res.Corruptions, res.Leaks)
			if qcode == 0 {
				return
			}
			before := qemuRaw(t, p)
			mode := RepairAll
			if qcode == 3 {
				mode = RepairLeaks
			}
			img, err = OpenForCheck(p, OpenOptions{})
			if err != nil {
				t.Fatalf("OpenForCheck rw: %v", err)
			}
			res, err = img.Check(mode)
			if cerr := img.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				t.Fatalf("repair: %v\n%v", err, res.Messages)
			}
			if res.ExitCode() != 0 {
				t.Fatalf("after repair our check says %d: %+v\n%v", res.ExitCode(), res, res.Messages)
			}
			if code, rep := qemuCheckJSON(t, p, ""); code != 0 {
				t.Fatalf("after our repair qemu-img check exits %d: %v\nour messages: %v", code, rep, res.Messages)
			}
			after := qemuRaw(t, p)
			if d.metadataAlias {
				return
			}
			if !bytes.Equal(before, after) {
				for i := range before {
					if before[i] != after[i] {
						t.Fatalf("repair changed readable bytes, first at guest offset %#x", i)
					}
				}
			}
		})
	}
}

// A refcount rebuild on an image with free space inside it puts the new
// refcount blocks and table into that space: the file does not grow, so
// an image on a block device can be repaired.
func TestCheckRebuildFitsInHoles(t *testing.T) {
	p := filepath.Join(t.TempDir(), "holes.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
	qemu(t, "qemu-io", "-c", "write -P 7 0 8M", "-c", "write -P 8 16M 1M", p)
	qemu(t, "qemu-io", "-d", "unmap", "-c", "discard 2M 4M", p)
	before := qemuRaw(t, p)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	h := readRawHeader(t, f)
	fi, _ := f.Stat()
	size := fi.Size()
	rb := int64(get64(t, f, h.refTableOff))
	if _, err := f.WriteAt(make([]byte, h.clusterSize), rb); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if code, _ := qemuCheckJSON(t, p, ""); code != 2 {
		t.Fatalf("qemu-img check of the damaged image: %d, want 2", code)
	}
	img, err := OpenForCheck(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := img.Check(RepairAll)
	newTable := int64(img.hdr.RefcountTableOffset)
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	if err != nil || res.ExitCode() != 0 {
		t.Fatalf("repair: %v %+v", err, res)
	}
	fi, err = os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != size || newTable >= size {
		t.Fatalf("rebuild grew the file from %d to %d bytes (new reftable at %#x)", size, fi.Size(), newTable)
	}
	if code, rep := qemuCheckJSON(t, p, ""); code != 0 {
		t.Fatalf("qemu-img check after rebuild: %d %v", code, rep)
	}
	if !bytes.Equal(before, qemuRaw(t, p)) {
		t.Fatal("rebuild changed readable bytes")
	}
}

// Across the format options, our check's JSON is qemu-img check's, byte
// for byte (filename aside), on images with data, compressed clusters,
// zero clusters, discards, snapshots and bitmaps.
func TestCheckJSONSameAsQemuAcrossFormats(t *testing.T) {
	for _, o := range []string{
		"cluster_size=65536",
		"cluster_size=512",
		"cluster_size=2097152",
		"compat=0.10",
		"refcount_bits=1",
		"refcount_bits=2",
		"refcount_bits=8",
		"refcount_bits=64",
		"extended_l2=on,cluster_size=131072",
		"lazy_refcounts=on",
		"compression_type=zstd",
	} {
		t.Run(o, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "f.qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", o, p, "40M")
			qemu(t, "qemu-io", "-c", "write -P 1 0 3M", "-c", "write -c 8M 2M", "-c", "write -z 12M 1M", "-c", "write 30M 100k", p)
			if !strings.HasPrefix(o, "refcount_bits=1") && !strings.HasPrefix(o, "refcount_bits=2") {
				qemu(t, "qemu-img", "snapshot", "-c", "s", p) // shared clusters need refcount 2+
			}
			qemu(t, "qemu-io", "-d", "unmap", "-c", "write -P 2 1M 1M", "-c", "discard 30M 1M", p)
			if !strings.Contains(o, "compat=0.10") {
				qemu(t, "qemu-img", "bitmap", "--add", p, "b")
			}
			want := qemu(t, "qemu-img", "check", "--output=json", p)
			img, err := OpenForCheck(p, OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			res, err := img.Check(RepairNone)
			img.Close()
			if err != nil {
				t.Fatal(err)
			}
			if got := string(res.MarshalCheckJSON(p, "qcow2")); got != want {
				t.Fatalf("ours:\n%s\nqemu-img:\n%s\n%v", got, want, res.Messages)
			}
		})
	}
}

// BenchmarkCheckImage opens and checks the image named by
// QCOW2_CSI_BENCH_IMAGE (tests/bench/check.sh makes a 4 GiB one): the
// check without the process start-up the command pays.
func BenchmarkCheckImage(b *testing.B) {
	p := os.Getenv("QCOW2_CSI_BENCH_IMAGE")
	if p == "" {
		b.Skip("QCOW2_CSI_BENCH_IMAGE not set (tests/bench/check.sh sets it)")
	}
	for i := 0; i < b.N; i++ {
		img, err := OpenForCheck(p, OpenOptions{ReadOnly: true})
		if err != nil {
			b.Fatal(err)
		}
		res, err := img.Check(RepairNone)
		img.Close()
		if err != nil || res.ExitCode() != 0 {
			b.Fatalf("%v %+v", err, res)
		}
	}
}
