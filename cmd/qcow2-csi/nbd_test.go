package main

import (
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

func TestParseNBDFlags(t *testing.T) {
	cases := []struct {
		name    string
		args    []string
		wantErr string
		check   func(*nbdOptions) bool
	}{
		{name: "defaults", args: []string{"disk.img"}, check: func(o *nbdOptions) bool {
			return o.file == "disk.img" && o.shared == 1 && !o.persistent && o.discard == "ignore" && !o.socketGiven && !o.bindGiven
		}},
		{name: "long and short flags, flags after FILE", args: []string{"--socket=/s", "disk.img", "-r", "-x", "vol", "--shared", "3", "-t", "-f", "raw"}, check: func(o *nbdOptions) bool {
			return o.socket == "/s" && o.readOnly && o.exportName == "vol" && o.shared == 3 && o.persistent && o.format == "raw"
		}},
		{name: "tcp", args: []string{"-b", "127.0.0.1", "-p", "10900", "d"}, check: func(o *nbdOptions) bool { return o.bindGiven && o.portGiven }},
		{name: "socket and tcp", args: []string{"-k", "/s", "-p", "1", "d"}, wantErr: "exclusive"},
		{name: "no file", args: []string{"-r"}, wantErr: "one FILE"},
		{name: "two files", args: []string{"a", "b"}, wantErr: "one FILE"},
		{name: "bad format", args: []string{"-f", "vmdk", "a"}, wantErr: "unsupported format"},
		{name: "bad shared", args: []string{"-e", "0", "a"}, wantErr: "shared"},
		{name: "bad port", args: []string{"-p", "99999", "a"}, wantErr: "port"},
		{name: "bad discard", args: []string{"--discard=maybe", "a"}, wantErr: "discard"},
		{name: "unknown flag", args: []string{"--frobnicate", "a"}, wantErr: "frobnicate"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseNBDFlags(tc.args, io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !tc.check(o) {
				t.Fatalf("parse %v: %+v, %v", tc.args, o, err)
			}
		})
	}
}

// startNBD runs the face in-process on a unix socket and waits until it
// listens; the returned channel yields serveNBD's result.
func startNBD(t *testing.T, args ...string) (string, chan error) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	o, err := parseNBDFlags(append([]string{"-k", sock}, args...), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serveNBD(o) }()
	for range 200 {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock, done
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("qcow2-csi nbd did not listen")
	return "", nil
}

func rawImage(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 8<<20); err != nil {
		t.Fatal(err)
	}
	return p
}

func runPeer(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, peer.Require(t, name), args...).CombinedOutput()
	return string(out), err
}

// Without -t the server exits when its last client leaves, as qemu-nbd.
func TestNBDExitsAfterLastClient(t *testing.T) {
	img := rawImage(t)
	// The dial in startNBD counts as a client; it left before nbdinfo came.
	sock, done := startNBD(t, "-f", "raw", img)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serveNBD: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server without -t did not exit after its client left")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

func TestNBDFlagsOnTheWire(t *testing.T) {
	img := rawImage(t)
	cases := []struct {
		args []string
		want []string
	}{
		{[]string{"-t", "-f", "raw"}, []string{"is_read_only: false", "can_multi_conn: false", "can_trim: true"}},
		{[]string{"-t", "-r", "-e", "2", "-x", "vol", "-D", "hello"}, []string{`export="vol":`, "description: hello", "is_read_only: true", "can_multi_conn: true", "can_trim: false"}},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			sock, done := startNBD(t, append(tc.args, img)...)
			out, err := runPeer(t, "nbdinfo", "--list", "nbd+unix:///?socket="+sock)
			if err != nil {
				t.Fatalf("nbdinfo: %v\n%s", err, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("nbdinfo --list lacks %q:\n%s", w, out)
				}
			}
			if strings.Contains(strings.Join(tc.args, " "), "-r") {
				out, err := runPeer(t, "qemu-io", "-f", "raw", "-c", "write 0 4k", "nbd+unix:///vol?socket="+sock)
				if err == nil && !strings.Contains(out, "ermission") && !strings.Contains(out, "read-only") && !strings.Contains(out, "not permitted") {
					t.Fatalf("write to -r export: %s", out)
				}
			}
			p, _ := os.FindProcess(os.Getpid())
			p.Signal(os.Interrupt)
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("serveNBD: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("no exit on SIGINT")
			}
		})
	}
}

// TCP only when asked: -b/-p listen on TCP and the export is reachable there.
func TestNBDTCP(t *testing.T) {
	img := rawImage(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	o, err := parseNBDFlags([]string{"-t", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-f", "raw", img}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serveNBD(o) }()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for range 200 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	out, err := runPeer(t, "nbdinfo", "--size", "nbd://"+addr)
	if err != nil || strings.TrimSpace(out) != "8388608" {
		t.Fatalf("nbdinfo --size over TCP: %q %v", out, err)
	}
	stopNBD(t, done)
}
