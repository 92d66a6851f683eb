package driver

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// stackTmpfs mounts a tmpfs at p holding a file named after it, and
// detaches it (and what remains stacked) when the test ends.
func stackTmpfs(t *testing.T, p, name string) {
	t.Helper()
	peer.Root(t)
	if err := unix.Mount(name, p, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p, name), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(p, unix.MNT_DETACH) })
}

func holds(p, name string) bool {
	_, err := os.Stat(filepath.Join(p, name))
	return err == nil
}

// TestUnmountOwnOldRecord: a volume whose record has no device number
// cannot tell its mount from the one under it; unmountOwn takes off the
// topmost mount (the driver's) and leaves the foreign one below. Before,
// it unmounted until nothing was left.
func TestUnmountOwnOldRecord(t *testing.T) {
	p := filepath.Join(t.TempDir(), "target")
	if err := os.Mkdir(p, 0o750); err != nil {
		t.Fatal(err)
	}
	stackTmpfs(t, p, "foreign")
	stackTmpfs(t, p, "volume")
	v := &stagedVolume{stageRecord: stageRecord{ID: "vol-old"}}
	if err := (&Driver{}).unmountOwn(v, "target path", p, false); err != nil {
		t.Fatal(err)
	}
	if holds(p, "volume") || !holds(p, "foreign") {
		t.Fatalf("after unmountOwn: volume file visible %v, foreign file visible %v; want the foreign mount only",
			holds(p, "volume"), holds(p, "foreign"))
	}
}

// TestUnmountOwnNoFollow: a target that is (by now) a symbolic link to a
// mount elsewhere is not unmounted through the link.
func TestUnmountOwnNoFollow(t *testing.T) {
	dir := t.TempDir()
	elsewhere := filepath.Join(dir, "elsewhere")
	if err := os.Mkdir(elsewhere, 0o750); err != nil {
		t.Fatal(err)
	}
	stackTmpfs(t, elsewhere, "foreign")
	link := filepath.Join(dir, "target")
	if err := os.Symlink(elsewhere, link); err != nil {
		t.Fatal(err)
	}
	v := &stagedVolume{stageRecord: stageRecord{ID: "vol-old"}}
	err := (&Driver{}).unmountOwn(v, "target path", link, false)
	if err == nil || !holds(elsewhere, "foreign") {
		t.Fatalf("unmountOwn through a link: %v; foreign mount intact %v; want an error and the mount intact", err, holds(elsewhere, "foreign"))
	}
}
