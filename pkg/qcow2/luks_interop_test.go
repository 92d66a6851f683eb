package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// Encrypted images against qemu-img and qemu-io 7.2, both ways. The
// secrets go to qemu as --object secret,data=: fine for a test.

const luksTestIterTime = 10 * time.Millisecond

func luksImageOpts(path, secretID string) string {
	return fmt.Sprintf("driver=qcow2,file.filename=%s,encrypt.key-secret=%s", path, secretID)
}

// qemuRawSecret is qemuRaw for an encrypted image.
func qemuRawSecret(t testing.TB, path, pass string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "raw")
	qemu(t, "qemu-img", "convert", "-U", "--object", "secret,id=sec0,data="+pass,
		"--image-opts", luksImageOpts(path, "sec0"), "-O", "raw", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ourRawSecret reads the whole disk with the passphrase.
func ourRawSecret(t testing.TB, path, pass string) []byte {
	t.Helper()
	return ourRawWith(t, path, OpenOptions{Passphrase: []byte(pass)})
}

func createLUKS(t testing.TB, path, pass string, o CreateOptions) *Image {
	t.Helper()
	o.Encryption = &EncryptionOptions{Passphrase: []byte(pass), IterTime: luksTestIterTime}
	img, err := Create(path, o)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	return img
}

func TestLUKSReadsQemuImage(t *testing.T) {
	for _, c := range []struct {
		name, opts string
	}{
		{"default", ""},
		{"cluster_4k", ",cluster_size=4096"},
		{"cluster_512", ",cluster_size=512"},
		{"aes128_sha1", ",encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1"},
		{"sha512", ",encrypt.hash-alg=sha512"},
		{"extended_l2", ",extended_l2=on"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "q.qcow2")
			qemu(t, "qemu-img", "create", "-f", "qcow2", "--object", "secret,id=sec0,data=s3cret",
				"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"+c.opts, p, "8M")
			// Unaligned writes, a snapshot, then overwrites (copy-on-write
			// into new host clusters with new tweaks), a zero range.
			io := func(cmd string) {
				qemu(t, "qemu-io", "--object", "secret,id=sec0,data=s3cret", "--image-opts", luksImageOpts(p, "sec0"), "-c", cmd)
			}
			io("write -P 0x5a 1000 300000")
			io("write -P 0x11 4194304 70000")
			qemu(t, "qemu-img", "snapshot", "--object", "secret,id=sec0,data=s3cret", "-c", "s1", "--image-opts", luksImageOpts(p, "sec0"))
			io("write -P 0xc3 2048 1000")
			io("write -z 4200000 9000")
			want := qemuRawSecret(t, p, "s3cret")
			if got := ourRawSecret(t, p, "s3cret"); !bytes.Equal(got, want) {
				t.Fatalf("our read differs from qemu-img convert at byte %d", firstDiff(got, want))
			}
			if bytes.Count(want, []byte{0x5a}) < 290000 {
				t.Fatalf("qemu's data is not there (%d bytes of 0x5a)", bytes.Count(want, []byte{0x5a}))
			}
			// The snapshot reads as qemu reads it.
			img, err := Open(p, OpenOptions{ReadOnly: true, NoLock: true, Passphrase: []byte("s3cret")})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			v, err := img.OpenSnapshot("s1")
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			snap := make([]byte, img.Size())
			if _, err := v.ReadAt(snap, 0); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(t.TempDir(), "snap.raw")
			qemu(t, "qemu-img", "convert", "-U", "--object", "secret,id=sec0,data=s3cret", "-l", "snapshot.name=s1",
				"--image-opts", luksImageOpts(p, "sec0"), "-O", "raw", out)
			wantSnap, _ := os.ReadFile(out)
			if !bytes.Equal(snap, wantSnap) {
				t.Fatalf("snapshot read differs from qemu at byte %d", firstDiff(snap, wantSnap))
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

func TestLUKSQemuReadsOurImage(t *testing.T) {
	for _, c := range []createCase{
		{"default", CreateOptions{}},
		{"cluster_4k", CreateOptions{ClusterSize: 4096}},
		{"cluster_512", CreateOptions{ClusterSize: 512}},
		{"extended_l2", CreateOptions{ExtendedL2: true}},
		{"lazy_refcounts", CreateOptions{LazyRefcounts: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "o.qcow2")
			const size = 6 << 20
			c.opts.Size = size
			img := createLUKS(t, p, "pw-ours", c.opts)
			ref := make([]byte, size)
			workload(t, img, ref, 7, 3, 40)
			if _, err := img.CreateSnapshot("snap"); err != nil {
				t.Fatal(err)
			}
			workload(t, img, ref, 8, 2, 20)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if r, out := qemuCheckSecret(t, p, "pw-ours"); r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
				t.Fatalf("qemu-img check: %s", out)
			}
			info := qemu(t, "qemu-img", "info", "-U", p)
			if !strings.Contains(info, "encrypted: yes") || !strings.Contains(info, "cipher alg: aes-256") {
				t.Fatalf("qemu-img info does not see a LUKS image:\n%s", info)
			}
			if got := qemuRawSecret(t, p, "pw-ours"); !bytes.Equal(got, ref) {
				t.Fatalf("qemu-img reads something else at byte %d", firstDiff(got, ref))
			}
			if got := ourRawSecret(t, p, "pw-ours"); !bytes.Equal(got, ref) {
				t.Fatalf("we read something else at byte %d", firstDiff(got, ref))
			}
		})
	}
}

// TestLUKSDataIsEncrypted: the written bytes are not in the file.
func TestLUKSDataIsEncrypted(t *testing.T) {
	p := filepath.Join(t.TempDir(), "e.qcow2")
	img := createLUKS(t, p, "pw", CreateOptions{Size: 1 << 20})
	marker := bytes.Repeat([]byte("MARKER-qcow2-csi-"), 64)
	if _, err := img.WriteAt(marker, 12345); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte("MARKER-qcow2-csi")) {
		t.Fatal("the marker is in the image file in clear")
	}
	if got := ourRawSecret(t, p, "pw")[12345 : 12345+len(marker)]; !bytes.Equal(got, marker) {
		t.Fatal("marker does not read back")
	}
}

func TestLUKSKeySlotRotation(t *testing.T) {
	p := filepath.Join(t.TempDir(), "k.qcow2")
	img := createLUKS(t, p, "old-pass", CreateOptions{Size: 2 << 20})
	data := bytes.Repeat([]byte{0xab}, 100000)
	if _, err := img.WriteAt(data, 5000); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	before := fileBytes(t, p)
	slot, err := img.AddKeySlot([]byte("new-pass"), KeySlotOptions{Slot: -1, IterTime: luksTestIterTime})
	if err != nil || slot != 1 {
		t.Fatalf("AddKeySlot = %d, %v", slot, err)
	}
	if _, err := img.RemoveKeySlots([]byte("new-pass"), -1); err != nil {
		// Removing the new slot leaves slot 0: allowed.
		t.Fatalf("RemoveKeySlots(new): %v", err)
	}
	if _, err := img.AddKeySlot([]byte("new-pass"), KeySlotOptions{Slot: -1, IterTime: luksTestIterTime}); err != nil {
		t.Fatal(err)
	}
	removed, err := img.RemoveKeySlots([]byte("old-pass"), -1)
	if err != nil || len(removed) != 1 || removed[0] != 0 {
		t.Fatalf("RemoveKeySlots(old) = %v, %v", removed, err)
	}
	if _, err := img.RemoveKeySlots([]byte("new-pass"), -1); err == nil {
		t.Fatal("removing the last key slot was allowed")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// The data clusters were not rewritten: only the LUKS region changed.
	after := fileBytes(t, p)
	h := mustHeader(t, p)
	lo, hi := int64(h.Crypto.Offset), int64(h.Crypto.Offset+h.Crypto.Length)
	for i := range min(len(before), len(after)) {
		if before[i] != after[i] && (int64(i) < lo || int64(i) >= hi) {
			t.Fatalf("byte %d outside the LUKS region changed", i)
		}
	}
	// qemu agrees: new opens, old does not; check is clean.
	if got := qemuRawSecret(t, p, "new-pass")[5000 : 5000+len(data)]; !bytes.Equal(got, data) {
		t.Fatal("qemu-img does not read the data with the new passphrase")
	}
	if out, err := runQemu(t, "qemu-img", "convert", "-U", "--object", "secret,id=sec0,data=old-pass",
		"--image-opts", luksImageOpts(p, "sec0"), "-O", "raw", filepath.Join(t.TempDir(), "x")); err == nil || !strings.Contains(out, "Invalid password") {
		t.Fatalf("qemu-img opened with the removed passphrase: err=%v %s", err, out)
	}
	if r, out := qemuCheckSecret(t, p, "new-pass"); r.Corruptions != 0 || r.Leaks != 0 {
		t.Fatalf("qemu-img check: %s", out)
	}
	// qemu adds a slot; we open with it, and qemu removes ours.
	qemu(t, "qemu-img", "amend", "--object", "secret,id=sec0,data=new-pass", "--object", "secret,id=sec1,data=qemu-pass",
		"--image-opts", luksImageOpts(p, "sec0"), "-o", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10")
	qemu(t, "qemu-img", "amend", "--object", "secret,id=sec0,data=new-pass", "--object", "secret,id=sec1,data=qemu-pass",
		"--image-opts", luksImageOpts(p, "sec1"), "-o", "encrypt.state=inactive,encrypt.old-secret=sec0")
	if got := ourRawSecret(t, p, "qemu-pass")[5000 : 5000+len(data)]; !bytes.Equal(got, data) {
		t.Fatal("we do not read the data with qemu's new key slot")
	}
	if _, err := Open(p, OpenOptions{ReadOnly: true, Passphrase: []byte("new-pass")}); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("open with the passphrase qemu removed: %v", err)
	}
}

func fileBytes(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustHeader(t testing.TB, p string) *header {
	t.Helper()
	b := fileBytes(t, p)
	h, err := decodeHeader(b[:min(len(b), 1<<maxClusterBits)], int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestLUKSWorkloadModel: random writes, zeroes and discards, with a
// snapshot in the middle, read back against a model, at several cluster
// sizes (the read-modify-write of partial sectors and clusters).
func TestLUKSWorkloadModel(t *testing.T) {
	for _, cs := range []int64{512, 65536} {
		t.Run(fmt.Sprint(cs), func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "w.qcow2")
			const size = 3<<20 + 512
			img := createLUKS(t, p, "pw", CreateOptions{Size: size, ClusterSize: cs})
			defer img.Close()
			ref := make([]byte, size)
			r := rand.New(rand.NewPCG(1, 2))
			for i := range 300 {
				off := r.Int64N(size - 1)
				n := min(r.Int64N(70000)+1, size-off)
				buf := make([]byte, n)
				for j := range buf {
					buf[j] = byte(r.Uint32())
				}
				if _, err := img.WriteAt(buf, off); err != nil {
					t.Fatal(err)
				}
				copy(ref[off:], buf)
				if i == 100 {
					if _, err := img.CreateSnapshot("s"); err != nil {
						t.Fatal(err)
					}
				}
			}
			got := make([]byte, size)
			if _, err := img.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, ref) {
				t.Fatalf("differs at %d", firstDiff(got, ref))
			}
		})
	}
}

// runQemu runs a qemu tool and returns its combined output and error.
func runQemu(t testing.TB, tool string, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(peer.Require(t, tool), args...).CombinedOutput()
	return string(out), err
}

// qemuCheckSecret is qemuCheck for an encrypted image (qemu-img check
// wants the key to open it).
func qemuCheckSecret(t testing.TB, path, pass string) (checkResult, string) {
	t.Helper()
	out, _ := exec.Command(peer.Require(t, "qemu-img"), "check", "-U", "--output=json", "--object", "secret,id=sec0,data="+pass,
		"--image-opts", luksImageOpts(path, "sec0")).Output()
	var r checkResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("qemu-img check %s: %v: %s", path, err, out)
	}
	return r, string(out)
}

// TestLUKSBitmapsResizeCheck: a persistent bitmap tracks writes to an
// encrypted image, the disk grows and shrinks, our check and qemu-img's
// find nothing wrong, and qemu reads the data.
func TestLUKSBitmapsResizeCheck(t *testing.T) {
	p := filepath.Join(t.TempDir(), "b.qcow2")
	img := createLUKS(t, p, "pw", CreateOptions{Size: 4 << 20})
	if err := img.AddBitmap("cbt", BitmapOptions{}); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0x77}, 70000)
	if _, err := img.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(8<<20, ResizeOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(data, 7<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	ci, err := OpenForCheck(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	res, err := ci.Check(RepairNone)
	ci.Close()
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("Check: %+v %v", res, err)
	}
	if r, out := qemuCheckSecret(t, p, "pw"); r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
		t.Fatalf("qemu-img check: %s", out)
	}
	raw := qemuRawSecret(t, p, "pw")
	if len(raw) != 8<<20 || !bytes.Equal(raw[1<<20:1<<20+len(data)], data) || !bytes.Equal(raw[7<<20:7<<20+len(data)], data) {
		t.Fatal("qemu-img reads other data")
	}
	out := qemu(t, "qemu-img", "info", "-U", p)
	if !strings.Contains(out, "cbt") {
		t.Fatalf("bitmap missing:\n%s", out)
	}
	// The bitmap saw both writes.
	img, err = Open(p, OpenOptions{ReadOnly: true, Passphrase: []byte("pw")})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	ext, err := img.BitmapExtents("cbt", 0, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	var dirty int64
	for _, e := range ext {
		if e.Dirty {
			dirty += e.Length
		}
	}
	// Two writes of 70000 bytes, 64 KiB granularity: 2 clusters each.
	if dirty != 4*65536 {
		t.Fatalf("bitmap has %d dirty bytes (%+v), want %d", dirty, ext, 4*65536)
	}
}
