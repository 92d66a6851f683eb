package nbd

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// serveFile serves a FileBackend over a unix socket with a Server and
// returns the nbd+unix URI of the export.
func serveFile(t *testing.T, path string, exp Export, opts ServerOptions) string {
	t.Helper()
	b, err := nbdattach.OpenFile(path, exp.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	exp.Backend = b
	srv, err := NewServer(opts, &exp)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		b.Close()
	})
	return "nbd+unix:///" + exp.Name + "?socket=" + sock
}

// run runs a peer program with a deadline and returns its combined output.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	p := peer.Require(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, p, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestPeerNbdinfoList(t *testing.T) {
	path := tempFile(t, 64<<20)
	uri := serveFile(t, path, Export{Name: "vol", Description: "a test disk", MultiConn: true}, ServerOptions{})
	sock := uri[strings.Index(uri, "socket=")+len("socket="):]
	got := run(t, "nbdinfo", "--list", "nbd+unix:///?socket="+sock)
	want := `protocol: newstyle-fixed without TLS, using structured packets
export="vol":
	description: a test disk
	export-size: 67108864 (64M)
	uri: nbd+unix:///vol?socket=` + sock + `
	contexts:
		base:allocation
	is_rotational: false
	is_read_only: false
	can_cache: true
	can_df: true
	can_fast_zero: true
	can_flush: true
	can_fua: true
	can_multi_conn: true
	can_trim: true
	can_zero: true
	block_size_minimum: 1
	block_size_preferred: 4096
	block_size_maximum: 33554432
`
	if got != want {
		t.Fatalf("nbdinfo --list:\n%s\nwant:\n%s", got, want)
	}
}

func TestPeerQemuIOAndMap(t *testing.T) {
	path := tempFile(t, 64<<20)
	uri := serveFile(t, path, Export{}, ServerOptions{})
	run(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 1M 64k",
		"-c", "write -P 0xcd 3M 4k",
		"-c", "write -z 1M 4k",
		"-c", "read -P 0 1M 4k",
		"-c", "read -P 0xab 1052672 61440",
		"-c", "read -P 0xcd 3M 4k",
		"-c", "discard 3M 4k",
		"-c", "flush",
		uri)
	got := run(t, "nbdinfo", "--map", uri)
	// write -z sends NO_HOLE: the range stays allocated, as data.
	want := `         0     1048576    3  hole,zero
   1048576       65536    0  data
   1114112    65994752    3  hole,zero
`
	if got != want {
		t.Fatalf("nbdinfo --map:\n%s\nwant:\n%s", got, want)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", path, uri)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data[1052672:1114112], bytes.Repeat([]byte{0xab}, 61440)) {
		t.Fatal("file does not hold the pattern written over NBD")
	}
}

// serveQemuNBD serves path with qemu-nbd -t (the oracle) and returns its URI.
func serveQemuNBD(t *testing.T, path string, args ...string) string {
	t.Helper()
	p := peer.Require(t, "qemu-nbd")
	sock := filepath.Join(t.TempDir(), "qemu.sock")
	cmd := exec.Command(p, append(append([]string{"-t", "-k", sock}, args...), path)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for range 200 {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return "nbd+unix:///?socket=" + sock
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("qemu-nbd did not come up: %s", stderr.String())
	return ""
}

func copyFile(t *testing.T, src string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), filepath.Base(src))
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestPeerSameAsQemuNBD runs the same qemu-io workload against this server
// and qemu-nbd on copies of one raw file and compares what nbdinfo sees.
func TestPeerSameAsQemuNBD(t *testing.T) {
	base := tempFile(t, 32<<20)
	ours, theirs := copyFile(t, base), copyFile(t, base)
	uriOurs := serveFile(t, ours, Export{}, ServerOptions{})
	// qemu-nbd ignores discards unless told to unmap; this server unmaps.
	uriTheirs := serveQemuNBD(t, theirs, "-f", "raw", "--discard=unmap")
	ops := []string{"-f", "raw",
		"-c", "write -P 0x11 0 128k",
		"-c", "write -P 0x22 8M 1M",
		"-c", "write -z -u 8M 512k",
		"-c", "write -z 16M 64k",
		"-c", "discard 64k 64k",
		"-c", "write -P 0x33 31M 1M",
		"-c", "flush",
	}
	run(t, "qemu-io", append(ops, uriOurs)...)
	run(t, "qemu-io", append(ops, uriTheirs)...)
	for _, args := range [][]string{{"--map"}, {"--map", "--totals"}, {"--size"}, {"--can", "zero"}, {"--can", "trim"}} {
		got := run(t, "nbdinfo", append(args, uriOurs)...)
		want := run(t, "nbdinfo", append(args, uriTheirs)...)
		if got != want {
			t.Errorf("nbdinfo %v:\nours:\n%s\nqemu-nbd:\n%s", args, got, want)
		}
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", uriOurs, uriTheirs)
}

func TestPeerCopyAndConvert(t *testing.T) {
	src := tempFile(t, 16<<20)
	if err := os.WriteFile(src, pattern(3<<20, 9), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(src, 16<<20); err != nil {
		t.Fatal(err)
	}
	dst := tempFile(t, 16<<20)
	uri := serveFile(t, dst, Export{}, ServerOptions{})
	// Into the export with nbdcopy (several connections, multi-conn off: one).
	run(t, "nbdcopy", src, uri)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
	// Out of the export with qemu-img convert and nbdcopy.
	out1 := filepath.Join(t.TempDir(), "out1.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out1)
	out2 := filepath.Join(t.TempDir(), "out2.raw")
	run(t, "nbdcopy", uri, out2)
	for _, o := range []string{out1, out2} {
		run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, o)
	}
	// And convert into the export from a file.
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", out1, uri)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, dst)
}

func TestPeerReadOnly(t *testing.T) {
	path := tempFile(t, 4<<20)
	uri := serveFile(t, path, Export{ReadOnly: true}, ServerOptions{})
	if got := run(t, "nbdinfo", "--is", "read-only", uri); got != "" {
		t.Fatalf("nbdinfo --is read-only printed %q", got)
	}
	p := peer.Require(t, "qemu-io")
	out, err := exec.Command(p, "-f", "raw", "-c", "write -P 1 0 4k", uri).CombinedOutput()
	// qemu-io opens a read-only export read-only and refuses the write itself.
	if err == nil && !strings.Contains(string(out), "ermission denied") && !strings.Contains(string(out), "read-only") && !strings.Contains(string(out), "not permitted") {
		t.Fatalf("write to a read-only export succeeded: %s", out)
	}
	data, _ := os.ReadFile(path)
	if !bytes.Equal(data, make([]byte, len(data))) {
		t.Fatal("read-only export was written")
	}
}

func TestPeerFioVerify(t *testing.T) {
	path := tempFile(t, 64<<20)
	uri := serveFile(t, path, Export{MultiConn: true}, ServerOptions{})
	for _, rw := range []string{"randwrite", "write"} {
		t.Run(rw, func(t *testing.T) {
			out := run(t, "fio", "--name=verify", "--ioengine=nbd", "--uri="+uri,
				"--rw="+rw, "--bs=4k", "--bsrange=512-64k", "--iodepth=16", "--size=16m",
				"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--numjobs=2", "--offset_increment=32m",
				"--output-format=terse", "--terse-version=3")
			if strings.Contains(out, "verify:") || strings.Contains(out, "bad ") {
				t.Fatalf("fio verify failed:\n%s", out)
			}
		})
	}
}
