package qcow2

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestLUKSOverlayOnEncryptedBase: an encrypted overlay on an encrypted
// base, made with EncryptionFrom (the base's LUKS header, so the same
// passphrase and master key open both): the groundwork of encrypted
// overlay clones. The backing is opened with the overlay's key; our read
// of the chain equals qemu-img convert's with encrypt.key-secret and
// backing.encrypt.key-secret, and qemu-img checks the overlay clean.
func TestLUKSOverlayOnEncryptedBase(t *testing.T) {
	dir := t.TempDir()
	basePath, ovPath := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "ov.qcow2")
	const size, pass = 4 << 20, "one key for the chain"
	ref := make([]byte, size)
	base := createLUKS(t, basePath, pass, CreateOptions{Size: size, ExtendedL2: true})
	workload(t, base, ref, 11, 2, 20)
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	base, err := Open(basePath, OpenOptions{ReadOnly: true, Passphrase: []byte(pass)})
	if err != nil {
		t.Fatal(err)
	}
	ov, err := Create(ovPath, CreateOptions{Size: size, BackingFile: basePath, BackingFormat: "qcow2", ExtendedL2: true, EncryptionFrom: base})
	if err != nil {
		t.Fatalf("Create overlay: %v", err)
	}
	base.Close()
	if err := ov.Close(); err != nil {
		t.Fatal(err)
	}
	ov, err = Open(ovPath, OpenOptions{Passphrase: []byte(pass)})
	if err != nil {
		t.Fatalf("Open overlay with the base's passphrase: %v", err)
	}
	got := make([]byte, size)
	if _, err := ov.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, ref) {
		t.Fatalf("the overlay reads something else than its base at byte %d", firstDiff(got, ref))
	}
	workload(t, ov, ref, 12, 2, 20) // partial writes copy up from the encrypted base
	mk, err := ov.MasterKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := ov.Close(); err != nil {
		t.Fatal(err)
	}
	if got := ourRawSecret(t, ovPath, pass); !bytes.Equal(got, ref) {
		t.Fatalf("we read the chain differently at byte %d", firstDiff(got, ref))
	}
	// A restarted node plugin opens with the master key alone (kept in the
	// kernel keyring): the base shares it.
	if got := ourRawWith(t, ovPath, OpenOptions{MasterKey: mk}); !bytes.Equal(got, ref) {
		t.Fatalf("with the master key, we read the chain differently at byte %d", firstDiff(got, ref))
	}
	out := filepath.Join(t.TempDir(), "raw")
	opts := luksImageOpts(ovPath, "sec0") + ",backing.encrypt.key-secret=sec0"
	qemu(t, "qemu-img", "convert", "-U", "--object", "secret,id=sec0,data="+pass, "--image-opts", opts, "-O", "raw", out)
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(want, ref) {
		t.Fatalf("qemu-img reads the chain differently at byte %d", firstDiff(want, ref))
	}
	check, err := exec.Command(peer.Require(t, "qemu-img"), "check", "-U", "--output=json", "--object", "secret,id=sec0,data="+pass,
		"--image-opts", opts).CombinedOutput()
	var r checkResult
	if jerr := json.Unmarshal(check, &r); err != nil || jerr != nil || r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
		t.Fatalf("qemu-img check of the overlay: %v %v: %s", err, jerr, check)
	}
	if fb, _ := os.ReadFile(ovPath); strings.Contains(string(fb), pass) {
		t.Fatal("the overlay holds the passphrase")
	}
}
