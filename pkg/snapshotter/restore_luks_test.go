package snapshotter

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestRestoreEncrypted: a restore (copy path) and a clone of the current
// disk of an encrypted image are encrypted under the same key slots: the
// same passphrase opens them, qemu-img reads them and checks them clean,
// and the data is not in the new files in clear.
func TestRestoreEncrypted(t *testing.T) {
	qemuImg := peer.Require(t, "qemu-img")
	dir := t.TempDir()
	const pass = "restore-pass"
	path := filepath.Join(dir, "src.qcow2")
	img, err := qcow2.Create(path, qcow2.CreateOptions{Size: testDisk,
		Encryption: &qcow2.EncryptionOptions{Passphrase: []byte(pass), IterTime: 10 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	marker := bytes.Repeat([]byte("RESTORE-MARKER "), 5000)
	if _, err := img.WriteAt(marker, 12345); err != nil {
		t.Fatal(err)
	}
	if _, err := Take(img, "s1", 1); err != nil {
		t.Fatal(err)
	}
	want, err := readSnapshot(img, "s1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("after the snapshot"), 12345); err != nil {
		t.Fatal(err)
	}
	check := func(p string, want []byte) {
		t.Helper()
		r, err := qcow2.Open(p, qcow2.OpenOptions{ReadOnly: true, Passphrase: []byte(pass)})
		if err != nil {
			t.Fatalf("open %s with the source's passphrase: %v", p, err)
		}
		got := make([]byte, r.Size())
		_, err = r.ReadAt(got, 0)
		enc := r.Encrypted()
		r.Close()
		if err != nil || !enc || !bytes.Equal(got[:len(want)], want) {
			t.Fatalf("%s: err %v, encrypted %v, data equal %v", p, err, enc, bytes.Equal(got[:len(want)], want))
		}
		if raw, _ := os.ReadFile(p); bytes.Contains(raw, []byte("RESTORE-MARKER")) {
			t.Fatalf("%s holds the data in clear", p)
		}
		out, err := exec.Command(qemuImg, "check", "--object", "secret,id=k,data="+pass, "--image-opts",
			"driver=qcow2,file.filename="+p+",encrypt.key-secret=k").CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img check %s: %v\n%s", p, err, out)
		}
	}
	// The snapshot, from the open image (a staged volume).
	dst := filepath.Join(dir, "restored.qcow2")
	if m, err := Restore(img, "s1", dst, RestoreOptions{}); err != nil || m != MethodCopy {
		t.Fatalf("Restore = %s, %v", m, err)
	}
	check(dst, want)
	// The current disk (a clone).
	cur := make([]byte, testDisk)
	if _, err := img.ReadAt(cur, 0); err != nil {
		t.Fatal(err)
	}
	clone := filepath.Join(dir, "clone.qcow2")
	if _, err := Restore(img, "", clone, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	check(clone, cur)
	img.Close()
	// Without the key the data cannot be copied, and nothing is left.
	nokey, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer nokey.Close()
	bad := filepath.Join(dir, "nokey.qcow2")
	if _, err := Restore(nokey, "s1", bad, RestoreOptions{SourceClosed: true, NoReflink: true}); !errors.Is(err, qcow2.ErrKeyRequired) && !errors.Is(err, qcow2.ErrInvalidOption) {
		t.Fatalf("Restore without the key: %v", err)
	}
	if _, err := os.Stat(bad); !os.IsNotExist(err) {
		t.Fatalf("a failed restore left %s: %v", bad, err)
	}
}
