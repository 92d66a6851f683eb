//go:build linux

package vm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/imagebackend"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// envServe makes the test binary act as a serving process instead of
// running tests: "attach" or "reattach", with envImage and envID. It stands
// for the node plugin, which the restart test kills and starts again.
const (
	envServe = "VMTEST_SERVE"
	envImage = "VMTEST_IMAGE"
	envID    = "VMTEST_ID"
	envConns = "VMTEST_CONNS"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(envServe); mode != "" {
		conns, _ := strconv.Atoi(os.Getenv(envConns))
		os.Exit(serveMain(mode, os.Getenv(envImage), os.Getenv(envID), conns))
	}
	os.Exit(m.Run())
}

// serveMain attaches (or reattaches) the image (qcow2 through the driver's
// adapter when its name says so, else raw), prints "READY <device>", and
// serves until SIGTERM, when it detaches and closes the image cleanly.
func serveMain(mode, img, id string, conns int) int {
	ctx := context.Background()
	var b nbdattach.Backend
	if strings.HasSuffix(img, ".qcow2") {
		q, err := qcow2.Open(img, qcow2.OpenOptions{})
		if err != nil {
			fmt.Println("ERROR", err)
			return 1
		}
		defer q.Close()
		if b, err = imagebackend.New(q, imagebackend.Options{}); err != nil {
			fmt.Println("ERROR", err)
			return 1
		}
	} else {
		f, err := nbdattach.OpenFile(img, false)
		if err != nil {
			fmt.Println("ERROR", err)
			return 1
		}
		defer f.Close()
		b = f
	}
	a := kernelAttacher()
	var dev nbdattach.Device
	var err error
	opts := nbdattach.AttachOptions{Connections: conns}
	switch mode {
	case "attach":
		dev, err = a.Attach(ctx, id, b, opts)
	case "reattach":
		dev, err = a.Reattach(ctx, id, b, opts)
	default:
		err = fmt.Errorf("unknown mode %q", mode)
	}
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	fmt.Println("READY", dev.Path())
	<-sig
	if err := dev.Detach(ctx); err != nil {
		fmt.Println("ERROR detach:", err)
		return 1
	}
	return 0
}

// server is one serving process.
type server struct {
	cmd *exec.Cmd
	dev string
	out bytes.Buffer
}

func startServer(t *testing.T, mode, img, id string, conns int) *server {
	t.Helper()
	s := &server{cmd: exec.Command(os.Args[0])}
	s.cmd.Env = append(os.Environ(), envServe+"="+mode, envImage+"="+img, envID+"="+id, envConns+"="+strconv.Itoa(conns))
	s.cmd.Stderr = &s.out
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	go io.Copy(io.Discard, stdout)
	dev, ok := strings.CutPrefix(strings.TrimSpace(line), "READY ")
	if err != nil || !ok {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		t.Fatalf("%s server: %q %v\n%s", mode, line, err, s.out.String())
	}
	s.dev = dev
	return s
}

func sectorsWritten(t *testing.T, dev string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "stat"))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	n, _ := strconv.ParseInt(f[6], 10, 64)
	return n
}

// TestGuestRestart kills the serving process in the middle of a dd write
// stream and starts a new one that reattaches: dd must finish without an
// I/O error and the image must hold exactly what dd wrote. Raw with one
// connection, and qcow2 (driver adapter) with two and O_DSYNC writes (see
// below); TestVM then runs qemu-img check and compare on the qcow2 image.
// dd is GNU dd (TestVM copies it in): busybox's has no oflag=dsync.
func TestGuestRestart(t *testing.T) {
	vmharness.Guest(t)
	for _, tt := range []struct {
		format string
		conns  int
	}{{"raw", 1}, {"qcow2", 2}} {
		t.Run(fmt.Sprintf("%s-%dconn", tt.format, tt.conns), func(t *testing.T) {
			testRestart(t, tt.format, tt.conns)
		})
	}
}

func testRestart(t *testing.T, format string, conns int) {
	const size = 48 << 20
	id := "vol-restart-" + format
	img := filepath.Join(t.TempDir(), "restart."+format)
	if format == "qcow2" {
		q, err := qcow2.Create(img, qcow2.CreateOptions{Size: size})
		if err != nil {
			t.Fatal(err)
		}
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
	} else {
		newRaw(t, img, size)
	}
	pattern := filepath.Join(t.TempDir(), "pattern")
	writePattern(t, pattern, 42, size)

	first := startServer(t, "attach", img, id, conns)
	// While the first process serves, nobody else may take the device over.
	probe, err := nbdattach.OpenFile(img, true)
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	if _, err := kernelAttacher().Reattach(context.Background(), id, probe, nbdattach.AttachOptions{}); err == nil ||
		!strings.Contains(err.Error(), "still serves it") {
		t.Errorf("Reattach of a live device: %v, want a refusal naming the live server", err)
	}
	// The device's counters run since boot: earlier tests may have used it.
	base := sectorsWritten(t, first.dev)
	// Raw: plain O_DIRECT writes; what the killed process wrote is in the
	// file's page cache and survives it. qcow2: the image library keeps
	// metadata (L2 updates) in memory until a flush, as qemu does, so a
	// write survives the death of its server only once it was flushed, as
	// a write survives a power failure only once it reached stable storage.
	// O_DSYNC makes every write FUA, so every write dd completed must
	// survive; those in flight at the kill are resent by the kernel.
	oflag := "oflag=direct"
	if format == "qcow2" {
		oflag = "oflag=direct,dsync"
	}
	dd := exec.Command("dd", "if="+pattern, "of="+first.dev, "bs=64k", oflag, "conv=fsync")
	var ddOut bytes.Buffer
	dd.Stdout, dd.Stderr = &ddOut, &ddOut
	if err := dd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill once the stream is well under way, not before it started.
	deadline := time.Now().Add(2 * time.Minute)
	for sectorsWritten(t, first.dev)-base < (size/4)/512 {
		if time.Now().After(deadline) {
			t.Fatalf("dd made no progress: %d sectors written", sectorsWritten(t, first.dev)-base)
		}
		time.Sleep(20 * time.Millisecond)
	}
	killedAt := (sectorsWritten(t, first.dev) - base) * 512
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	first.cmd.Wait()
	t.Logf("killed the serving process after %d of %d bytes", killedAt, size)

	// The device is still configured, nobody serves it, and it still
	// carries the volume's identifier.
	a := kernelAttacher()
	infos, err := a.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := nbdattach.DeviceInfo{Path: first.dev, ID: id, Size: size, Connected: false}
	var got []nbdattach.DeviceInfo
	for _, in := range infos {
		if in.ID == want.ID {
			got = append(got, in)
		}
	}
	if len(got) != 1 || got[0] != want {
		t.Errorf("List after the kill: %+v, want [%+v]", got, want)
	}

	second := startServer(t, "reattach", img, id, conns)
	if second.dev != first.dev {
		t.Errorf("reattached %s, want %s", second.dev, first.dev)
	}
	if err := dd.Wait(); err != nil {
		t.Errorf("dd failed across the restart: %v\n%s", err, ddOut.String())
	}
	if killedAt >= size {
		t.Errorf("the kill came after dd had written everything; the test proved nothing")
	}
	if err := second.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := second.cmd.Wait(); err != nil {
		t.Errorf("second server: %v\n%s", err, second.out.String())
	}
	data := readImage(t, img, size)
	wantData, _ := os.ReadFile(pattern)
	if !bytes.Equal(data, wantData) {
		n := 0
		for n < len(data) && n < len(wantData) && data[n] == wantData[n] {
			n++
		}
		t.Errorf("image differs from what dd wrote, first at byte %d", n)
	}
	if format == "qcow2" {
		copySparse(t, img, filepath.Join(vmharness.SharePath, "restart.qcow2"))
		copySparse(t, pattern, filepath.Join(vmharness.SharePath, "restart.pattern"))
	}
}

// readImage reads the whole virtual disk of a raw or qcow2 image.
func readImage(t *testing.T, img string, size int) []byte {
	t.Helper()
	if !strings.HasSuffix(img, ".qcow2") {
		data, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	q, err := qcow2.Open(img, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	data := make([]byte, size)
	if _, err := q.ReadAt(data, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return data
}
