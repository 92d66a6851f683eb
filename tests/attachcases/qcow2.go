package attachcases

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// Qcow2 is the qcow2 format as the node plugin serves it: an image made by
// qemu-img (64 KiB clusters), opened with pkg/qcow2 and adapted by
// driver.ImageBackend. qemu-img is the oracle: map for allocation, check for
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

// qcow2Image is an open image with the driver's adapter over it.
type qcow2Image struct {
	*driver.ImageBackend
	img *qcow2.Image
}

func (q qcow2Image) Close() error { return q.img.Close() }

func openQcow2(path string) (Image, error) {
	img, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		return nil, err
	}
	b, err := driver.NewImageBackend(img, driver.ImageBackendOptions{})
	if err != nil {
		img.Close()
		return nil, err
	}
	return qcow2Image{ImageBackend: b, img: img}, nil
}
