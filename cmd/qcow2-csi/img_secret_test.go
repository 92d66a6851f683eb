package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

func TestParseObjects(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "pw")
	if err := os.WriteFile(f, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b64 := filepath.Join(dir, "pw64")
	if err := os.WriteFile(b64, []byte("c2VjcmV0"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := []struct {
		def, id, want string
	}{
		{"secret,id=a,data=pw", "a", "pw"},
		{"qom-type=secret,id=a,data=p,,w", "a", "p,w"},
		{"secret,id=a,file=" + f, "a", "from-file\n"}, // byte for byte, as qemu
		{"secret,id=a,file=" + b64 + ",format=base64", "a", "secret"},
	}
	for _, c := range good {
		s, err := parseObjects([]string{c.def})
		if err != nil {
			t.Fatalf("%s: %v", c.def, err)
		}
		if got, err := s.get(c.id); err != nil || string(got) != c.want {
			t.Fatalf("%s: %q %v", c.def, got, err)
		}
	}
	for _, def := range []string{
		"iothread,id=a",
		"secret,data=x",
		"secret,id=a",
		"secret,id=a,data=x,file=" + f,
		"secret,id=a,file=" + filepath.Join(dir, "missing"),
		"secret,id=a,data=!!,format=base64",
		"secret,id=a,data=x,format=hex",
		"secret,id=a,data=x,keyid=k",
	} {
		if _, err := parseObjects([]string{def}); err == nil {
			t.Errorf("%s: accepted", def)
		}
	}
	if _, err := parseObjects([]string{"secret,id=a,data=x", "secret,id=a,data=y"}); err == nil {
		t.Error("duplicate id accepted")
	}
}

func img(t *testing.T, run func([]string) int, args ...string) {
	t.Helper()
	if rc := run(args); rc != 0 {
		t.Fatalf("img %v: exit %d", args, rc)
	}
}

func imageOpts(p, id string) string {
	return "driver=qcow2,file.filename=" + p + ",encrypt.key-secret=" + id
}

// The img face on encrypted images against qemu-img: create, convert both
// ways and between keys, compare, info, and key rotation with amend.
func TestImgEncryptedLikeQemu(t *testing.T) {
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "pw")
	if err := os.WriteFile(pwFile, []byte("file-pass"), 0o600); err != nil {
		t.Fatal(err)
	}
	fileSecret := "secret,id=k,file=" + pwFile
	// A plain source with data, made by qemu.
	plain := filepath.Join(dir, "plain.qcow2")
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", plain, "4M")
	mustQemu(t, "qemu-io", "-c", "write -P 0x61 100000 300000", "-c", "write -P 0x62 3M 4096", plain)

	// Ours: create encrypted, convert plain -> encrypted.
	ours := filepath.Join(dir, "ours.qcow2")
	img(t, runImgConvert, "--object", fileSecret, "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10", plain, ours)
	if out := mustQemuOut(t, "qemu-img", "info", ours); !strings.Contains(out, "encrypted: yes") {
		t.Fatalf("qemu-img info: %s", out)
	}
	mustQemu(t, "qemu-img", "compare", "--object", "secret,id=k,data=file-pass", "--image-opts", imageOpts(ours, "k"), "driver=qcow2,file.filename="+plain)
	mustQemu(t, "qemu-img", "check", "--object", "secret,id=k,data=file-pass", "--image-opts", imageOpts(ours, "k"))

	// Encrypted -> encrypted under another key, and back to raw; compare
	// with our face and with qemu's.
	rekeyed := filepath.Join(dir, "rekeyed.qcow2")
	img(t, runImgConvert, "--object", fileSecret, "--object", "secret,id=n,data=new", "--image-opts", "-O", "qcow2",
		"-o", "encrypt.format=luks,encrypt.key-secret=n,encrypt.iter-time=10", imageOpts(ours, "k"), rekeyed)
	if rc := runImgCompare([]string{"--object", "secret,id=n,data=new", "--image-opts", imageOpts(rekeyed, "n"), "driver=qcow2,file.filename=" + plain}); rc != 0 {
		t.Fatalf("img compare rekeyed plain: %d", rc)
	}
	raw := filepath.Join(dir, "out.raw")
	img(t, runImgConvert, "--object", "secret,id=n,data=new", "--image-opts", "-O", "raw", imageOpts(rekeyed, "n"), raw)
	qraw := filepath.Join(dir, "q.raw")
	mustQemu(t, "qemu-img", "convert", "-O", "raw", plain, qraw)
	if a, b := readFile(t, raw), readFile(t, qraw); !bytes.Equal(a, b) {
		t.Fatal("encrypted -> raw differs from qemu's plain -> raw")
	}

	// Without the key: data is refused with qemu's words, metadata works.
	if rc := runImgConvert([]string{"-O", "raw", rekeyed, raw}); rc == 0 {
		t.Fatal("convert of an encrypted image without key succeeded")
	}
	if rc := runImgCheck([]string{rekeyed}); rc != 0 {
		t.Fatalf("img check without key: %d", rc)
	}
	if rc := runImgConvert([]string{"--object", "secret,id=n,data=wrong", "--image-opts", "-O", "raw", imageOpts(rekeyed, "n"), raw}); rc == 0 {
		t.Fatal("convert with the wrong passphrase succeeded")
	}

	// Rotation: add a slot, remove the old, qemu-img agrees.
	img(t, runImgAmend, "--object", "secret,id=n,data=new", "--object", "secret,id=r,data=rotated", "--image-opts",
		"-o", "encrypt.state=active,encrypt.new-secret=r,encrypt.iter-time=10", imageOpts(rekeyed, "n"))
	img(t, runImgAmend, "--object", "secret,id=n,data=new", "--object", "secret,id=r,data=rotated", "--image-opts",
		"-o", "encrypt.state=inactive,encrypt.old-secret=n", imageOpts(rekeyed, "r"))
	mustQemu(t, "qemu-img", "compare", "--object", "secret,id=r,data=rotated", "--image-opts", imageOpts(rekeyed, "r"), "driver=qcow2,file.filename="+plain)
	if _, rc := runQemuImg(t, "compare", "--object", "secret,id=n,data=new", "--image-opts", imageOpts(rekeyed, "n"), "driver=qcow2,file.filename="+plain); rc == 0 {
		t.Fatal("qemu-img opened with the removed key")
	}
	if rc := runImgAmend([]string{"--object", "secret,id=r,data=rotated", "--image-opts", "-o", "encrypt.state=inactive,encrypt.old-secret=r", imageOpts(rekeyed, "r")}); rc == 0 {
		t.Fatal("amend removed the last key slot")
	}

	// qemu's encrypted image through our face, byte-identical.
	qenc := filepath.Join(dir, "qenc.qcow2")
	mustQemu(t, "qemu-img", "convert", "--object", "secret,id=q,data=qp", "-O", "qcow2",
		"-o", "encrypt.format=luks,encrypt.key-secret=q,encrypt.iter-time=10", plain, qenc)
	img(t, runImgConvert, "--object", "secret,id=q,data=qp", "--image-opts", "-O", "raw", imageOpts(qenc, "q"), raw)
	if a, b := readFile(t, raw), readFile(t, qraw); !bytes.Equal(a, b) {
		t.Fatal("our read of qemu's encrypted image differs")
	}
	got := captureStdout(t, func() { img(t, runImgInfo, "--output=json", qenc) })
	want := mustQemuOut(t, "qemu-img", "info", "--output=json", qenc)
	if got != want {
		t.Fatalf("img info --output=json differs from qemu-img:\n%s\nwant\n%s", got, want)
	}
}

func mustQemuOut(t *testing.T, tool string, args ...string) string {
	t.Helper()
	out, err := exec.Command(peer.Require(t, tool), args...).Output()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", tool, args, err, out)
	}
	return string(out)
}
