package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// luksFixture makes an encrypted image with data and returns its path and
// the file offset of its LUKS header.
func luksFixture(t *testing.T) (string, int64) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "h.qcow2")
	img := createLUKS(t, p, "right", CreateOptions{Size: 1 << 20})
	if _, err := img.WriteAt(bytes.Repeat([]byte{7}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return p, int64(mustHeader(t, p).Crypto.Offset)
}

func patchFile(t *testing.T, p string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func TestLUKSWrongPassphraseWritesNothing(t *testing.T) {
	p, _ := luksFixture(t)
	before := fileBytes(t, p)
	for _, pass := range []string{"wrong", "righ", "right ", ""} {
		_, err := Open(p, OpenOptions{Passphrase: []byte(pass)})
		if pass == "" {
			// An empty, non-nil passphrase is a passphrase.
			if !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("empty passphrase: %v", err)
			}
			continue
		}
		if !errors.Is(err, ErrWrongPassphrase) || !strings.Contains(err.Error(), "invalid password") {
			t.Fatalf("Open(%q) = %v, want ErrWrongPassphrase", pass, err)
		}
	}
	if !bytes.Equal(before, fileBytes(t, p)) {
		t.Fatal("a failed open changed the file")
	}
}

func TestLUKSWithoutKey(t *testing.T) {
	p, _ := luksFixture(t)
	before := fileBytes(t, p)
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatalf("metadata-only open: %v", err)
	}
	if !img.Encrypted() || img.Encryption().UnlockedKeySlot != -1 {
		t.Fatalf("Encrypted=%v info=%+v", img.Encrypted(), img.Encryption())
	}
	buf := make([]byte, 512)
	if _, err := img.ReadAt(buf, 0); !errors.Is(err, ErrKeyRequired) {
		t.Fatalf("ReadAt without key: %v", err)
	}
	if _, err := img.WriteAt(buf, 0); !errors.Is(err, ErrKeyRequired) {
		t.Fatalf("WriteAt without key: %v", err)
	}
	if err := img.WriteZeroes(0, 65536, ZeroMayUnmap); !errors.Is(err, ErrKeyRequired) {
		t.Fatalf("WriteZeroes without key: %v", err)
	}
	if _, err := img.AddKeySlot([]byte("x"), KeySlotOptions{Slot: -1}); !errors.Is(err, ErrKeyRequired) {
		t.Fatalf("AddKeySlot without key: %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before[:len(before)], fileBytes(t, p)[:len(before)]) {
		t.Fatal("an open without key changed the file")
	}
	// Check needs no key and finds the LUKS region referenced.
	ci, err := OpenForCheck(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ci.Close()
	res, err := ci.Check(RepairNone)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("Check: %+v %v", res, err)
	}
}

func TestLUKSHostileHeader(t *testing.T) {
	slot := func(i int) int64 { return luksOffSlots + int64(i*luksSlotLen) }
	for _, c := range []struct {
		name  string
		at    int64 // offset in the LUKS header; -1: qcow2 header patch
		patch []byte
		want  error
		msg   string
	}{
		{"magic", 0, []byte("LUKZ"), ErrCorrupt, "luks magic"},
		{"version2", luksOffVersion, []byte{0, 2}, ErrUnsupported, "LUKS2"},
		{"cipher", luksOffCipherName, []byte("twofish\x00"), ErrUnsupported, "cipher \"twofish\""},
		{"mode", luksOffCipherMode, []byte("cbc-essiv:sha256\x00"), ErrUnsupported, "cipher mode"},
		{"hash", luksOffHashSpec, []byte("md5\x00\x00\x00"), ErrUnsupported, "md5"},
		{"unterminated", luksOffHashSpec, bytes.Repeat([]byte("a"), luksNameLen), ErrCorrupt, "NUL-terminated"},
		{"key_bytes", luksOffKeyBytes, be32(48), ErrCorrupt, "key_bytes"},
		{"mk_iters_0", luksOffMKDigestIter, be32(0), ErrCorrupt, "mk_digest_iterations"},
		{"payload", luksOffPayload, be32(1 << 30), ErrCorrupt, "payload_offset"},
		{"stripes", slot(0) + 44, be32(3999), ErrCorrupt, "stripes"},
		{"key_offset_out", slot(0) + 40, be32(1 << 30), ErrCorrupt, "key_offset"},
		{"key_offset_header", slot(1) + 40, be32(0), ErrCorrupt, "key_offset"},
		{"key_overlap", slot(1) + 40, be32(9), ErrCorrupt, "overlaps"},
		{"active_garbage", slot(2), be32(0x12345678), ErrCorrupt, "neither enabled"},
		{"slot_iters_0", slot(0) + 4, be32(0), ErrCorrupt, "iterations"},
		{"slot_iters_dos", slot(0) + 4, be32(0xffffffff), ErrUnsupported, "PBKDF2 budget"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, base := luksFixture(t)
			patchFile(t, p, base+c.at, c.patch)
			start := time.Now()
			_, err := Open(p, OpenOptions{ReadOnly: true, Passphrase: []byte("right")})
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("Open = %v, want %v containing %q", err, c.want, c.msg)
			}
			if el := time.Since(start); el > 5*time.Second {
				// Not a timing assert on speed: a refusal must not first
				// run the work it refuses.
				t.Fatalf("refusal took %v", el)
			}
		})
	}
}

func TestLUKSHostileQcow2Header(t *testing.T) {
	// Offsets of the crypto header extension's data in our header: find it.
	for _, c := range []struct {
		name string
		mod  func(h *header)
		msg  string
	}{
		{"misaligned", func(h *header) { h.Crypto.Offset += 512 }, "crypto_header_offset"},
		{"past_eof", func(h *header) { h.Crypto.Offset = 1 << 40 }, "crypto_header_offset"},
		{"short", func(h *header) { h.Crypto.Length = 100 }, "crypto_header_length"},
		{"huge", func(h *header) { h.Crypto.Length = 1 << 40 }, "crypto_header_length"},
		{"no_method", func(h *header) { h.CryptMethod = 0 }, "crypt_method"},
		{"aes_method", func(h *header) { h.CryptMethod = cryptAES }, "legacy AES"},
		{"no_ext", func(h *header) { h.Crypto = nil }, "crypt_method"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, _ := luksFixture(t)
			h := mustHeader(t, p)
			c.mod(h)
			buf, err := h.encode()
			if err != nil {
				t.Fatal(err)
			}
			patchFile(t, p, 0, buf)
			_, err = Open(p, OpenOptions{ReadOnly: true, Passphrase: []byte("right")})
			var fe *FormatError
			if !errors.As(err, &fe) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("Open = %v, want a FormatError naming %q", err, c.msg)
			}
		})
	}
}

// TestLUKSDamagedKeyMaterial: a damaged slot never yields a wrong key
// (the master key digest catches it).
func TestLUKSDamagedKeyMaterial(t *testing.T) {
	p, base := luksFixture(t)
	patchFile(t, p, base+8*luksSectorSize+1000, []byte{0xff, 0x00, 0xff})
	if _, err := Open(p, OpenOptions{ReadOnly: true, Passphrase: []byte("right")}); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("Open with damaged key material = %v", err)
	}
}

func TestLUKSIterationBudget(t *testing.T) {
	p, base := luksFixture(t)
	patchFile(t, p, base+luksOffSlots+4, be32(50000))
	// 50000 + the digest's iterations is over a budget of 20000 ...
	_, err := Open(p, OpenOptions{ReadOnly: true, Passphrase: []byte("right"), MaxPBKDF2Iterations: 20000})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "key slot 0") {
		t.Fatalf("Open over budget = %v", err)
	}
	// ... and within the default one: the count is honoured (the slot
	// then no longer opens, the material was made with fewer).
	if _, err := Open(p, OpenOptions{ReadOnly: true, Passphrase: []byte("right")}); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("Open within budget = %v", err)
	}
}

func TestLUKSCreateRefusals(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		o    CreateOptions
	}{
		{"v2", CreateOptions{Version: 2}},
		{"prealloc", CreateOptions{Preallocation: PreallocFull}},
	} {
		c.o.Size = 1 << 20
		c.o.Encryption = &EncryptionOptions{Passphrase: []byte("x"), IterTime: luksTestIterTime}
		if _, err := Create(filepath.Join(dir, c.name), c.o); !errors.Is(err, ErrInvalidOption) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	for _, e := range []EncryptionOptions{
		{},
		{Passphrase: []byte("x"), Format: "aes"},
		{Passphrase: []byte("x"), CipherAlg: "serpent-256"},
		{Passphrase: []byte("x"), HashAlg: "md5"},
	} {
		if _, err := Create(filepath.Join(dir, "e"), CreateOptions{Size: 1 << 20, Encryption: &e}); !errors.Is(err, ErrInvalidOption) {
			t.Errorf("%+v: %v", e, err)
		}
	}
	p := filepath.Join(dir, "c")
	img := createLUKS(t, p, "x", CreateOptions{Size: 1 << 20})
	defer img.Close()
	if _, err := img.WriteCompressed(make([]byte, 65536), 0); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("WriteCompressed on an encrypted image: %v", err)
	}
	if err := img.Amend(AmendOptions{Compat: "0.10"}); !errors.Is(err, ErrInvalidOption) {
		t.Fatalf("downgrade of an encrypted image: %v", err)
	}
}

// FuzzLUKSHeader: the LUKS header decoder never panics, and what it
// accepts re-encodes to the same bytes.
func FuzzLUKSHeader(f *testing.F) {
	seed, err := os.ReadFile("testdata/luks/qemu-header.bin")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeLUKSHeader(b, 0, 2068480)
		if err != nil {
			return
		}
		h2, err := decodeLUKSHeader(h.encode(), 0, 2068480)
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if *h2 != *h {
			t.Fatalf("round trip changed the header: %+v -> %+v", h, h2)
		}
	})
}

// TestLUKSMasterKeyOpen: the master key Image.MasterKey gives opens the
// image again without the passphrase (a restarted node plugin's path) and
// reads the data; a wrong, short or bit-flipped key is refused by the
// digest and writes nothing; a plain image has no master key.
func TestLUKSMasterKeyOpen(t *testing.T) {
	p, _ := luksFixture(t)
	img, err := Open(p, OpenOptions{Passphrase: []byte("right"), ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	mk, err := img.MasterKey()
	if err != nil || len(mk) != 64 {
		t.Fatalf("MasterKey = %d bytes, %v", len(mk), err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := img.MasterKey(); !errors.Is(err, ErrClosed) {
		t.Fatalf("MasterKey after Close: %v", err)
	}
	before := fileBytes(t, p)
	flipped := append([]byte(nil), mk...)
	flipped[17] ^= 1
	for name, key := range map[string][]byte{"flipped": flipped, "short": mk[:32], "zero": make([]byte, 64)} {
		_, err := Open(p, OpenOptions{MasterKey: key})
		if !errors.Is(err, ErrWrongPassphrase) {
			t.Errorf("Open with a %s master key = %v, want ErrWrongPassphrase", name, err)
		}
	}
	if _, err := Open(p, OpenOptions{MasterKey: mk, Passphrase: []byte("right")}); !errors.Is(err, ErrInvalidOption) {
		t.Errorf("Open with both = %v, want ErrInvalidOption", err)
	}
	if _, err := Open(p, OpenOptions{MasterKey: mk, MaxPBKDF2Iterations: luksMinIters - 1}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("Open with a digest over the budget = %v, want ErrUnsupported", err)
	}
	if !bytes.Equal(before, fileBytes(t, p)) {
		t.Fatal("a refused open changed the file")
	}
	img, err = Open(p, OpenOptions{MasterKey: mk})
	if err != nil {
		t.Fatalf("Open with the master key: %v", err)
	}
	clear(mk) // the image keeps its own copy
	got := make([]byte, 4096)
	if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{7}, 4096)) {
		t.Fatalf("read through the master key: %v", err)
	}
	if _, err := img.WriteAt([]byte("after"), 8192); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if b := ourRawSecret(t, p, "right"); string(b[8192:8197]) != "after" {
		t.Fatal("a write through the master key does not read back with the passphrase")
	}
	plain := filepath.Join(t.TempDir(), "plain.qcow2")
	pi, err := Create(plain, CreateOptions{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer pi.Close()
	if _, err := pi.MasterKey(); !errors.Is(err, ErrInvalidOption) {
		t.Fatalf("MasterKey of a plain image: %v", err)
	}
}
