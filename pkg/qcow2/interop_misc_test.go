package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestDirtyLazyRefcountsRepair: an image left dirty by a qemu-io abort with
// lazy refcounts has wrong refcounts; opening it read-write repairs them.
func TestDirtyLazyRefcountsRepair(t *testing.T) {
	for _, opts := range []string{"lazy_refcounts=on", "lazy_refcounts=on,cluster_size=4k,refcount_bits=4", "lazy_refcounts=on,extended_l2=on"} {
		t.Run(opts, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "8M")
			qemu(t, "qemu-io", "-c", "write -P 0x31 0 1M", "-c", "write -P 0x32 3M 700k", "-c", "write -z 5M 1M", p)
			// abort leaves the image as a crash would.
			_ = exec.Command(peer.Require(t, "qemu-io"), "-c", "write -P 0x33 6M 1M", "-c", "flush", "-c", "abort", p).Run()
			want := qemuRaw(t, p)
			// Read-only, the dirty image reads the same without a repair.
			if !bytes.Equal(ourRaw(t, p), want) {
				t.Fatal("dirty image reads differently from qemu-img convert")
			}
			if r, out := qemuCheck(t, p); r.Corruptions == 0 && r.Leaks == 0 {
				// qemu-img check on a dirty image reports what it sees; the
				// dirty bit is what matters.
				_ = out
			}
			h := readHeaderForTest(t, p)
			if h.Incompatible&IncompatDirty == 0 {
				t.Fatal("qemu-io abort did not leave the dirty bit set")
			}
			img, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if h := readHeaderForTest(t, p); h.Incompatible&IncompatDirty != 0 {
				t.Fatal("dirty bit still set after repair")
			}
			checkClean(t, p)
			if !bytes.Equal(qemuRaw(t, p), want) {
				t.Fatal("data changed by the repair")
			}
		})
	}
}

func readHeaderForTest(t *testing.T, p string) *header {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	h, err := decodeHeader(b[:min(len(b), 1<<16)], int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestLockingWithQemu: qemu refuses an image we hold read-write, and we
// refuse one qemu holds.
func TestLockingWithQemu(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	img, err := Create(p, CreateOptions{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(peer.Require(t, "qemu-img"), "info", p).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "lock") {
		t.Fatalf("qemu-img info on an image we hold read-write succeeded: %s", out)
	}
	if _, err := Open(p, OpenOptions{ReadOnly: true}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second read-only open while we write: %v, want ErrLocked", err)
	}
	img.Close()
	// Now qemu holds it.
	cmd := exec.Command(peer.Require(t, "qemu-io"), "-c", "sleep 3000", p)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	// Wait until qemu-io holds its locks (a probe of ours must not win the
	// race and make qemu-io fail instead).
	waitForLock(t, p)
	_, lastErr := Open(p, OpenOptions{})
	if !errors.Is(lastErr, ErrLocked) {
		t.Fatalf("open while qemu-io holds the image: %v, want ErrLocked", lastErr)
	}
	// A read-only qemu user shares reading with our read-only open.
	cmd.Process.Kill()
	cmd.Wait()
	ro := exec.Command(peer.Require(t, "qemu-io"), "-r", "-c", "sleep 3000", p)
	if err := ro.Start(); err != nil {
		t.Fatal(err)
	}
	defer ro.Wait()
	defer ro.Process.Kill()
	waitForLock(t, p)
	im, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open next to read-only qemu-io: %v", err)
	}
	im.Close()
}

// TestHostileImages: broken images give errors naming what is wrong, never
// a panic.
func TestHostileImages(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	qemu(t, "qemu-io", "-c", "write -P 1 0 1M", base)
	good, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	cases := []struct {
		name string
		data []byte
		want error
		msg  string
	}{
		{"empty", nil, ErrNotQcow2, ""},
		{"not_qcow2", []byte("hello world, not an image at all................................................"), ErrNotQcow2, ""},
		{"truncated_header", good[:50], ErrCorrupt, "header"},
		{"version_4", mutate(func(b []byte) []byte { be.PutUint32(b[4:], 4); return b }), ErrUnsupported, "version"},
		{"cluster_bits_30", mutate(func(b []byte) []byte { be.PutUint32(b[20:], 30); return b }), ErrCorrupt, "cluster_bits"},
		{"l1_size_huge", mutate(func(b []byte) []byte { be.PutUint32(b[36:], 0xffffffff); return b }), ErrCorrupt, "l1_size at offset 36: 4294967295 exceeds limit 4194304"},
		{"l1_past_eof", mutate(func(b []byte) []byte { be.PutUint64(b[40:], 1<<40); return b }), ErrCorrupt, "l1_table_offset"},
		{"l1_unaligned", mutate(func(b []byte) []byte { be.PutUint64(b[40:], 0x30001); return b }), ErrCorrupt, "l1_table_offset"},
		{"reftable_past_eof", mutate(func(b []byte) []byte { be.PutUint64(b[48:], 1<<40); return b }), ErrCorrupt, "refcount_table_offset"},
		{"reftable_huge", mutate(func(b []byte) []byte { be.PutUint32(b[56:], 1<<20); return b }), ErrCorrupt, "refcount_table_clusters"},
		{"too_many_snapshots", mutate(func(b []byte) []byte { be.PutUint32(b[60:], 1<<20); return b }), ErrCorrupt, "nb_snapshots"},
		{"unknown_incompat", mutate(func(b []byte) []byte { be.PutUint64(b[72:], 1<<40); return b }), ErrUnsupported, "bit 40"},
		{"encrypted", mutate(func(b []byte) []byte { be.PutUint32(b[32:], 1); return b }), ErrUnsupported, "crypt_method"},
		{"size_too_big_for_l1", mutate(func(b []byte) []byte { be.PutUint64(b[24:], 1<<50); return b }), ErrCorrupt, "l1_size"},
		{"refcount_order_7", mutate(func(b []byte) []byte { be.PutUint32(b[96:], 7); return b }), ErrCorrupt, "refcount_order"},
		{"l2_past_eof", mutate(func(b []byte) []byte {
			l1 := be.Uint64(b[40:])
			be.PutUint64(b[l1:], 0x8000000000000000|1<<40)
			return b
		}), ErrCorrupt, "past end of file"},
		{"l1_reserved_bits", mutate(func(b []byte) []byte {
			l1 := be.Uint64(b[40:])
			be.PutUint64(b[l1:], be.Uint64(b[l1:])|1)
			return b
		}), ErrCorrupt, "reserved bits"},
		{"l1_overlaps_header", mutate(func(b []byte) []byte { be.PutUint64(b[40:], 0); return b }), ErrCorrupt, "l1_table_offset"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "h.qcow2")
			if err := os.WriteFile(p, c.data, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p, OpenOptions{ReadOnly: true, NoLock: true})
			if err == nil {
				img.Close()
				t.Fatalf("Open succeeded, want %v", c.want)
			}
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("Open: %v, want %v mentioning %q", err, c.want, c.msg)
			}
		})
	}
	// A data cluster pointing into the L1 table: reads are refused as
	// corrupt... and a write there marks the image corrupt.
	t.Run("data_over_metadata_marks_corrupt", func(t *testing.T) {
		b := bytes.Clone(good)
		l1 := be.Uint64(b[40:])
		l2 := be.Uint64(b[l1:]) &^ (1 << 63)
		be.PutUint64(b[l2:], 0x8000000000000000|l1) // guest cluster 0 -> the L1 table
		p := filepath.Join(t.TempDir(), "c.qcow2")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := Open(p, OpenOptions{NoLock: true})
		if err != nil {
			t.Fatal(err)
		}
		_, err = img.WriteAt([]byte("x"), 0)
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("write over metadata: %v, want ErrCorrupt", err)
		}
		if _, err := img.WriteAt([]byte("x"), 1<<20); !errors.Is(err, ErrReadOnly) {
			t.Fatalf("write after corruption: %v, want ErrReadOnly", err)
		}
		img.Close()
		if h := readHeaderForTest(t, p); h.Incompatible&IncompatCorrupt == 0 {
			t.Fatal("corrupt bit not set")
		}
		if _, err := Open(p, OpenOptions{NoLock: true}); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("read-write open of a corrupt image: %v", err)
		}
		im, err := Open(p, OpenOptions{NoLock: true, ReadOnly: true})
		if err != nil {
			t.Fatalf("read-only open of a corrupt image: %v", err)
		}
		im.Close()
	})
}

// waitForLock waits until some process holds qemu's consistent-read lock
// byte on p.
func waitForLock(t *testing.T, p string) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := 0; i < 500; i++ {
		if held, _ := probe(int(f.Fd()), lockPermBase+permConsistentRead); held {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("qemu-io never took its image lock")
}

// TestUnknownAutoclearAndExtensions: unknown autoclear bits are cleared by
// the first write, unknown header extensions survive a header rewrite.
func TestUnknownAutoclearAndExtensions(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "4M")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	h, err := decodeHeader(b[:65536], int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	h.Autoclear |= 1 << 9
	h.Unknown = append(h.Unknown, rawExtension{Type: 0x12345678, Data: []byte("keep me")})
	enc, err := h.encode()
	if err != nil {
		t.Fatal(err)
	}
	copy(b, enc)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := readHeaderForTest(t, p); h.Autoclear&(1<<9) == 0 {
		t.Fatal("autoclear bit cleared before any write")
	}
	if _, err := img.WriteAt([]byte("data"), 4096); err != nil {
		t.Fatal(err)
	}
	if h := readHeaderForTest(t, p); h.Autoclear&(1<<9) != 0 || h.Incompatible&IncompatDirty == 0 {
		t.Fatalf("after first write: autoclear %#x incompatible %#x", h.Autoclear, h.Incompatible)
	}
	if err := img.Close(); err != nil { // rewrites the header (dirty bit off)
		t.Fatal(err)
	}
	h2 := readHeaderForTest(t, p)
	if len(h2.Unknown) != 1 || h2.Unknown[0].Type != 0x12345678 || string(h2.Unknown[0].Data) != "keep me" {
		t.Fatalf("unknown extension not preserved: %+v", h2.Unknown)
	}
	if h2.Incompatible&IncompatDirty != 0 {
		t.Fatal("dirty bit left set after Close")
	}
	checkClean(t, p)
}
