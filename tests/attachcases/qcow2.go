package attachcases

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// Qcow2 is the qcow2 format as the node plugin serves it: an image made by
// qemu-img (64 KiB clusters), opened by driver.Qcow2Images (pkg/qcow2 under
// imagebackend.Backend). qemu-img is the oracle: map for allocation, check for
// consistency, compare for contents.
var Qcow2 = Format{
	Name: "qcow2",
	Create: func(path string, size int64) (Image, error) {
		qemuImg, err := exec.LookPath("qemu-img")
		if err != nil {
			return nil, fmt.Errorf("qemu-img is needed to create qcow2 images: %w", err)
		}
		if out, err := exec.Command(qemuImg, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, strconv.FormatInt(size, 10)).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("qemu-img create: %v: %s", err, out)
		}
		return openQcow2(path)
	},
	Open: openQcow2,
	Grow: growQcow2,
	Allocated: func(t *testing.T, path string, off, length int64) int64 {
		t.Helper()
		out, err := exec.Command(peer.Require(t, "qemu-img"), "map", "--output=json", "-f", "qcow2", path).Output()
		if err != nil {
			t.Fatalf("qemu-img map %s: %v", path, err)
		}
		var exts []struct {
			Start, Length int64
			Data          bool
		}
		if err := json.Unmarshal(out, &exts); err != nil {
			t.Fatalf("qemu-img map output: %v", err)
		}
		var n int64
		for _, e := range exts {
			if !e.Data {
				continue
			}
			lo, hi := max(e.Start, off), min(e.Start+e.Length, off+length)
			if hi > lo {
				n += hi - lo
			}
		}
		return n
	},
	Check: func(t *testing.T, path string) {
		t.Helper()
		out, err := exec.Command(peer.Require(t, "qemu-img"), "check", "--output=json", "-f", "qcow2", path).Output()
		var full map[string]any
		_ = json.Unmarshal(out, &full)
		if err != nil {
			t.Fatalf("qemu-img check %s: %v: %s", path, err, out)
		}
		for _, k := range []string{"corruptions", "leaks", "check-errors"} {
			if v, ok := full[k]; ok && v != float64(0) {
				t.Fatalf("qemu-img check %s: %s = %v: %s", path, k, v, out)
			}
		}
	},
	Equal: func(t *testing.T, path, ref string) {
		t.Helper()
		out, err := exec.Command(peer.Require(t, "qemu-img"), "compare", "-f", "qcow2", "-F", "raw", path, ref).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img compare %s %s: %v: %s", path, ref, err, out)
		}
	},
}

// qcow2Image is an image opened the way the node plugin opens it
// (driver.Qcow2Images), so the cases exercise the production adapter.
type qcow2Image struct {
	nbdattach.Backend
	di driver.Image
}

func (q qcow2Image) Close() error { return q.di.Close() }

func openQcow2(path string) (Image, error) {
	di, err := driver.Qcow2Images{}.Open(context.Background(), path, driver.ImageOpenOptions{})
	if err != nil {
		return nil, err
	}
	return qcow2Image{Backend: di.Backend(), di: di}, nil
}

func growQcow2(img Image, size int64) error {
	q, ok := img.(qcow2Image)
	if !ok {
		return fmt.Errorf("qcow2 grow: %T is not a qcow2 image of this package", img)
	}
	if !(driver.Qcow2Images{}).CanGrow() {
		return fmt.Errorf("qcow2 grow: the image library cannot resize yet: %w", errors.ErrUnsupported)
	}
	return q.di.Resize(context.Background(), size)
}
