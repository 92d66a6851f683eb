package qcow2

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/tests/child"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

func peerPath(t testing.TB, p string) string { return peer.Require(t, p) }

// Crash test for snapshot create/delete/revert and resize: a child process
// (this test binary, re-executed) loops over those operations and writes;
// the parent kills it with SIGKILL at a random moment, many times over, and
// after every kill:
//   - the image opens read-write (a dirty image is repaired there),
//   - qemu-img check finds no corruption (leaks are allowed, as for qemu;
//     none on compat=1.1 once the dirty image was repaired; on compat=0.10,
//     which has no dirty bit, COPIED flags may lag the refcounts, as
//     qemu's own ordering lets them),
//   - every snapshot in the table reads back exactly what the disk held
//     when it was taken (the child records a hash before each create).

const crashEnv = "QCOW2_SNAPSHOT_CRASH_CHILD"

func TestSnapshotCrash(t *testing.T) {
	if os.Getenv(crashEnv) != "" {
		t.Skip("child mode runs in TestSnapshotCrashChild")
	}
	for _, version := range []int{3, 2} {
		t.Run(fmt.Sprintf("v%d", version), func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "crash.qcow2")
			img, err := Create(path, CreateOptions{Size: 4 << 20, Version: version, ClusterSize: 4096})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewSource(int64(version)))
			for round := 0; round < 20; round++ {
				crashOnce(t, path, dir, round, time.Duration(5+rng.Intn(150))*time.Millisecond)
				verifyAfterCrash(t, path, dir, version, round)
			}
		})
	}
}

// crashOnce runs the child until it reports it is working, lets it run for
// delay and kills it.
func crashOnce(t *testing.T, path, dir string, round int, delay time.Duration) {
	t.Helper()
	cmd, line := child.Start(t, "TestSnapshotCrashChild", crashEnv+"="+path, "QCOW2_CRASH_DIR="+dir, "QCOW2_CRASH_SEED="+strconv.Itoa(round))
	if !strings.HasPrefix(line, "ready") {
		t.Fatalf("round %d: child did not start: %q", round, line)
	}
	time.Sleep(delay)
	child.Kill(cmd)
}

func verifyAfterCrash(t *testing.T, path, dir string, version, round int) {
	t.Helper()
	// qemu first, on the file exactly as the crash left it. A compat=1.1
	// image is either clean or dirty; a dirty one is repaired by the next
	// read-write open (qemu's or ours), so qemu's check of it before that
	// is no measure.
	img0, err := Open(path, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Fatalf("round %d: read-only open after the crash: %v", round, err)
	}
	dirty := img0.hdr.Incompatible&IncompatDirty != 0
	img0.Close()
	if !dirty {
		crashCheck(t, path, version, round, "after the crash", false)
	}
	img, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatalf("round %d: open after the crash: %v", round, err)
	}
	t.Logf("round %d: dirty %t, %d snapshots, size %d", round, dirty, len(img.Snapshots()), img.Size())
	for _, s := range img.Snapshots() {
		want, err := os.ReadFile(filepath.Join(dir, "hash-"+s.Name))
		if err != nil {
			t.Fatalf("round %d: snapshot %q has no recorded hash: %v", round, s.Name, err)
		}
		got := ourSnapshotRaw(t, img, s.ID)
		if len(got) != int(s.DiskSize) {
			t.Fatalf("round %d: snapshot %q reads %d bytes, disk size %d", round, s.Name, len(got), s.DiskSize)
		}
		sum := sha256.Sum256(got)
		if hex.EncodeToString(sum[:]) != strings.TrimSpace(string(want)) {
			t.Fatalf("round %d: snapshot %q content differs from the disk when it was taken", round, s.Name)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// Our open repaired a dirty image: nothing may leak then.
	crashCheck(t, path, version, round, "after our open", dirty)
	// Start the next round clean (the write path leaks what a crash
	// interrupts, as qemu's does).
	qemu(t, "qemu-img", "check", "-q", "-r", "all", path)
}

// crashCheck runs qemu-img check. compat=1.1: no error (and no leak when
// noLeaks: after a repair). compat=0.10 has no dirty bit and qemu's own steps leave windows where COPIED flags and
// refcounts disagree (a refcount raised before the flag is cleared, or the
// reverse); those mismatches and leaks are all a crash may leave there: no
// refcount below its references, no other error.
func crashCheck(t *testing.T, path string, version, round int, when string, noLeaks bool) {
	t.Helper()
	r, out := qemuCheck(t, path)
	if version >= 3 {
		if r.Corruptions != 0 || r.CheckErrors != 0 || (noLeaks && r.Leaks != 0) {
			human, _ := exec.Command(peerPath(t, "qemu-img"), "check", "-U", path).CombinedOutput()
			if len(human) > 3000 {
				human = human[:3000]
			}
			ops, _ := os.ReadFile(filepath.Join(filepath.Dir(path), "ops.log"))
			if len(ops) > 600 {
				ops = ops[len(ops)-600:]
			}
			t.Fatalf("round %d: qemu-img check %s: %s\n%s\nops:\n%s", round, when, out, human, ops)
		}
		return
	}
	if r.CheckErrors != 0 {
		t.Fatalf("round %d: qemu-img check %s: %s", round, when, out)
	}
	if r.Corruptions == 0 {
		return
	}
	human, _ := exec.Command(peerPath(t, "qemu-img"), "check", "-U", path).CombinedOutput()
	for _, l := range strings.Split(string(human), "\n") {
		if strings.HasPrefix(l, "ERROR") && !strings.HasPrefix(l, "ERROR OFLAG_COPIED") {
			t.Fatalf("round %d: qemu-img check %s: %s", round, when, human)
		}
	}
}

// TestSnapshotCrashChild is the workload the crash test kills.
func TestSnapshotCrashChild(t *testing.T) {
	path := os.Getenv(crashEnv)
	if path == "" {
		t.Skip("runs only as the child of TestSnapshotCrash")
	}
	dir := os.Getenv("QCOW2_CRASH_DIR")
	seed, _ := strconv.Atoi(os.Getenv("QCOW2_CRASH_SEED"))
	img, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(int64(seed)))
	logf, _ := os.OpenFile(filepath.Join(dir, "ops.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	logOp := func(format string, a ...any) { fmt.Fprintf(logf, format+"\n", a...); logf.Sync() }
	fmt.Println("ready")
	for i := 0; ; i++ {
		size := img.Size()
		logOp("writes %d", i)
		for k := 0; k < 3; k++ {
			n := int64(1 + rng.Intn(20000))
			off := rng.Int63n(size - n)
			if _, err := img.WriteAt(bytes.Repeat([]byte{byte(i + k)}, int(n)), off); err != nil {
				t.Fatal(err)
			}
		}
		switch op := rng.Intn(10); {
		case op < 5:
			// Record what the snapshot must hold before taking it.
			name := fmt.Sprintf("r%d-%d", seed, i)
			buf := make([]byte, size)
			if _, err := img.ReadAt(buf, 0); err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(buf)
			writeSynced(t, filepath.Join(dir, "hash-"+name), hex.EncodeToString(sum[:]))
			logOp("create %s", name)
			if _, err := img.CreateSnapshot(name); err != nil {
				t.Fatal(err)
			}
			logOp("created %s", name)
		case op < 7:
			if s := img.Snapshots(); len(s) > 0 {
				x := s[rng.Intn(len(s))]
				logOp("delete %s", x.Name)
				if err := img.DeleteSnapshot(x.ID); err != nil {
					t.Fatal(err)
				}
				logOp("deleted %s", x.Name)
			}
		case op < 8:
			if s := img.Snapshots(); len(s) > 0 {
				err := img.RevertToSnapshot(s[rng.Intn(len(s))].ID)
				if err != nil && img.hdr.Version >= 3 {
					t.Fatal(err)
				}
			}
		default:
			newSize := int64(2<<20 + 512*rng.Intn(8192))
			err := img.Resize(newSize, ResizeOptions{Shrink: true})
			if err != nil && !(img.hdr.Version < 3 && len(img.Snapshots()) > 0) {
				t.Fatal(err)
			}
		}
		if len(img.Snapshots()) > 8 {
			logOp("delete oldest %s", img.Snapshots()[0].Name)
			if err := img.DeleteSnapshot(img.Snapshots()[0].ID); err != nil {
				t.Fatal(err)
			}
			logOp("deleted oldest")
		}
	}
}

func writeSynced(t *testing.T, path, s string) {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
}
