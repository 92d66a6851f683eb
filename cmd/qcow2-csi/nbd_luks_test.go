package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// The nbd face serves an encrypted image with its key (--object,
// --image-opts, as qemu-nbd): qemu-io writes through it, fio verifies,
// and qemu-img reads the result with the key and checks it clean. Without
// the key it refuses to start.
func TestNBDEncrypted(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "enc.qcow2")
	secret := "secret,id=k,data=nbd-pass"
	opts := "driver=qcow2,file.filename=" + p + ",encrypt.key-secret=k"
	mustQemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "--object", secret,
		"-o", "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10", p, "32M")
	o, err := parseNBDFlags([]string{"-k", filepath.Join(dir, "x.sock"), p}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := serveNBD(o); err == nil {
		t.Fatal("served an encrypted image without its key")
	}
	s, done := startNBD(t, "-t", "--object", secret, "--image-opts", opts)
	if out := mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5c 1M 3M", "-c", "read -P 0x5c 1M 3M", "nbd+unix:///?socket="+s); strings.Contains(out, "failed") {
		t.Fatalf("qemu-io over our server: %s", out)
	}
	out, err := runPeer(t, "fio", "--name=v", "--ioengine=nbd", "--uri=nbd+unix:///?socket="+s,
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=8m", "--size=8m",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0")
	if err != nil {
		t.Fatalf("fio verify: %v\n%s", err, out)
	}
	stopNBD(t, done)
	mustRun(t, "qemu-img", "check", "--object", secret, "--image-opts", opts)
	if out := mustRun(t, "qemu-io", "--object", secret, "--image-opts", "-c", "read -P 0x5c 1M 3M", opts); strings.Contains(out, "failed") {
		t.Fatalf("qemu-io on the image: %s", out)
	}
}
