package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// qemuNBD serves path with qemu-nbd (the oracle) and returns its socket.
func qemuNBD(t *testing.T, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "q.sock")
	cmd := exec.Command(peer.Require(t, "qemu-nbd"), append([]string{"-t", "-k", sock}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for range 200 {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("qemu-nbd did not start: %s", stderr.String())
	return ""
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runPeer(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func stopNBD(t *testing.T, done chan error) {
	t.Helper()
	p, _ := os.FindProcess(os.Getpid())
	p.Signal(os.Interrupt)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serveNBD: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no exit on SIGINT")
	}
}

// A qcow2 image and an overlay over it, made by qemu, served read-only by
// both servers: nbdinfo must see the same exports, the same allocation map
// and the same allocation depths, and qemu-img the same data.
func TestNBDQcow2SameAsQemuNBD(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	mustRun(t, "qemu-io", "-c", "write -P 0xab 1M 64k", "-c", "write -z 4M 128k", "-c", "write -P 1 60M 4M", base)
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	mustRun(t, "qemu-io", "-c", "write -P 0xcd 8M 64k", "-c", "write -z 60M 1M", "-c", "discard 1M 64k", top)
	for _, img := range []string{base, top} {
		t.Run(filepath.Base(img), func(t *testing.T) {
			q := qemuNBD(t, "-r", "-A", "-x", "vol", "-f", "qcow2", img)
			s, done := startNBD(t, "-t", "-r", "-A", "-x", "vol", "-f", "qcow2", img)
			defer stopNBD(t, done)
			uq, us := "nbd+unix:///vol?socket="+q, "nbd+unix:///vol?socket="+s
			for _, args := range [][]string{{"--map"}, {"--map=qemu:allocation-depth"}, {"--map", "--totals"}} {
				want := mustRun(t, "nbdinfo", append(args, uq)...)
				got := mustRun(t, "nbdinfo", append(args, us)...)
				if got != want {
					t.Errorf("nbdinfo %v:\nours:\n%s\nqemu-nbd:\n%s", args, got, want)
				}
			}
			want := strings.ReplaceAll(mustRun(t, "nbdinfo", "--list", "nbd+unix:///?socket="+q), q, "SOCK")
			got := strings.ReplaceAll(mustRun(t, "nbdinfo", "--list", "nbd+unix:///?socket="+s), s, "SOCK")
			if got != want {
				t.Errorf("nbdinfo --list:\nours:\n%s\nqemu-nbd:\n%s", got, want)
			}
			mustRun(t, "qemu-img", "compare", uq, us)
		})
	}
}

// Writes through this server land in a qcow2 image that qemu-img checks
// clean and reads back identically to the same writes made through qemu-nbd.
func TestNBDQcow2Writes(t *testing.T) {
	dir := t.TempDir()
	ours, theirs := filepath.Join(dir, "ours.qcow2"), filepath.Join(dir, "theirs.qcow2")
	for _, p := range []string{ours, theirs} {
		mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "32M")
	}
	ops := []string{
		"-c", "write -P 0x11 0 100k",
		"-c", "write -P 0x22 5M 3M",
		"-c", "write -z -u 6M 1M",
		"-c", "write -z 7M 4k",
		"-c", "write -P 0x33 31M 1M",
		"-c", "read -P 0x22 5M 1M",
		"-c", "flush",
	}
	q := qemuNBD(t, "--discard=unmap", "-f", "qcow2", theirs)
	s, done := startNBD(t, "-t", "--discard=unmap", "-f", "qcow2", ours)
	mustRun(t, "qemu-io", append(append([]string{"-f", "raw"}, ops...), "nbd+unix:///?socket="+q)...)
	mustRun(t, "qemu-io", append(append([]string{"-f", "raw"}, ops...), "nbd+unix:///?socket="+s)...)
	gotMap := mustRun(t, "nbdinfo", "--map", "nbd+unix:///?socket="+s)
	wantMap := mustRun(t, "nbdinfo", "--map", "nbd+unix:///?socket="+q)
	if gotMap != wantMap {
		t.Errorf("nbdinfo --map after writes:\nours:\n%s\nqemu-nbd:\n%s", gotMap, wantMap)
	}
	out, err := runPeer(t, "fio", "--name=v", "--ioengine=nbd", "--uri=nbd+unix:///?socket="+s,
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=12m", "--size=8m",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0")
	if err != nil {
		t.Fatalf("fio verify: %v\n%s", err, out)
	}
	stopNBD(t, done)
	mustRun(t, "qemu-img", "check", ours)
	// The fio range differs on purpose; compare what both wrote elsewhere.
	mustRun(t, "qemu-img", "compare", "-U", "--image-opts",
		"driver=raw,size=12582912,file.driver=qcow2,file.file.filename="+ours,
		"driver=raw,size=12582912,file.driver=qcow2,file.file.filename="+theirs)
}

// Dirty bitmaps: the qemu:dirty-bitmap:NAME context must read the same from
// this server as from qemu-nbd, for a bitmap qemu filled and for one this
// server filled while serving writes.
func TestNBDQcow2DirtyBitmap(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "bm.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	mustRun(t, "qemu-img", "bitmap", "--add", "-g", "65536", img, "b1")
	mustRun(t, "qemu-io", "-c", "write 1M 64k", "-c", "write 10M 4k", "-c", "write -z 20M 1M", img)

	var lastMap string
	compare := func(t *testing.T) {
		t.Helper()
		q := qemuNBD(t, "-r", "-B", "b1", "-f", "qcow2", img)
		s, done := startNBD(t, "-t", "-r", "-B", "b1", "-f", "qcow2", img)
		defer stopNBD(t, done)
		for _, args := range [][]string{{"--map=qemu:dirty-bitmap:b1"}, {"--map"}} {
			want := mustRun(t, "nbdinfo", append(args, "nbd+unix:///?socket="+q)...)
			got := mustRun(t, "nbdinfo", append(args, "nbd+unix:///?socket="+s)...)
			if got != want {
				t.Errorf("nbdinfo %v:\nours:\n%s\nqemu-nbd:\n%s", args, got, want)
			}
			if args[0] != "--map" {
				lastMap = got
			}
		}
		want := strings.ReplaceAll(mustRun(t, "nbdinfo", "--list", "nbd+unix:///?socket="+q), q, "SOCK")
		got := strings.ReplaceAll(mustRun(t, "nbdinfo", "--list", "nbd+unix:///?socket="+s), s, "SOCK")
		if got != want {
			t.Errorf("nbdinfo --list:\nours:\n%s\nqemu-nbd:\n%s", got, want)
		}
	}
	t.Run("filled by qemu", compare)
	wantQemu := `         0     1048576    0  clean
   1048576       65536    1  dirty
   1114112     9371648    0  clean
  10485760       65536    1  dirty
  10551296    10420224    0  clean
  20971520     1048576    1  dirty
  22020096    45088768    0  clean
`
	if lastMap != wantQemu {
		t.Fatalf("bitmap filled by qemu:\n%s\nwant:\n%s", lastMap, wantQemu)
	}

	// Writes through this server dirty the bitmap; qemu then reads it back.
	s, done := startNBD(t, "-t", "-B", "b1", "-f", "qcow2", img)
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 3 40M 8k", "-c", "write -P 4 63M 1M", "nbd+unix:///?socket="+s)
	stopNBD(t, done)
	mustRun(t, "qemu-img", "check", img)
	t.Run("filled by this server", compare)
	wantOurs := strings.Replace(wantQemu, "  22020096    45088768    0  clean\n", `  22020096    19922944    0  clean
  41943040       65536    1  dirty
  42008576    24051712    0  clean
  66060288     1048576    1  dirty
`, 1)
	if lastMap != wantOurs {
		t.Fatalf("bitmap after writes through this server:\n%s\nwant:\n%s", lastMap, wantOurs)
	}

	o, _ := parseNBDFlags([]string{"-k", filepath.Join(dir, "x.sock"), "-B", "nope", img}, nil)
	if err := serveNBD(o); err == nil || !strings.Contains(err.Error(), `"nope" is not found`) {
		t.Fatalf("missing bitmap: %v", err)
	}
}
