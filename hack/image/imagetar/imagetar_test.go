package imagetar

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/internal/hostbin"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// readArchive returns the manifest, the config and the layer's files.
func readArchive(t *testing.T, b []byte) (manifest []map[string]any, config map[string]any, layer map[string]*tar.Header, data map[string][]byte) {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name], _ = io.ReadAll(tr)
	}
	if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil || len(manifest) != 1 {
		t.Fatalf("manifest.json: %v %s", err, files["manifest.json"])
	}
	if err := json.Unmarshal(files[manifest[0]["Config"].(string)], &config); err != nil {
		t.Fatal(err)
	}
	layer, data = map[string]*tar.Header{}, map[string][]byte{}
	lt := tar.NewReader(bytes.NewReader(files[manifest[0]["Layers"].([]any)[0].(string)]))
	for {
		h, err := lt.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		layer[h.Name] = h
		data[h.Name], _ = io.ReadAll(lt)
	}
	return
}

func TestSingleImageIsDeterministic(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "tool")
	if err := os.WriteFile(bin, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	var ids []string
	var archives [][]byte
	for i := 0; i < 2; i++ {
		im, err := Single("tool", bin)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		id, err := im.WriteDockerArchive(&buf, "example.test/tool:v1")
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
		archives = append(archives, buf.Bytes())
	}
	if ids[0] != ids[1] || !bytes.Equal(archives[0], archives[1]) {
		t.Fatalf("two builds of the same image differ: %s %s", ids[0], ids[1])
	}
	manifest, config, layer, data := readArchive(t, archives[0])
	if tags := manifest[0]["RepoTags"].([]any); len(tags) != 1 || tags[0] != "example.test/tool:v1" {
		t.Errorf("RepoTags %v", tags)
	}
	if ep := config["config"].(map[string]any)["Entrypoint"].([]any); len(ep) != 1 || ep[0] != "/tool" {
		t.Errorf("Entrypoint %v", ep)
	}
	h := layer["tool"]
	if h == nil || h.Mode != 0o755 || h.Uid != 0 || h.ModTime.Unix() != 0 || string(data["tool"]) != "#!/bin/true\n" {
		t.Fatalf("layer entry tool: %+v", h)
	}
	if l := layer["bin"]; l == nil || l.Typeflag != tar.TypeSymlink || l.Linkname != "usr/bin" {
		t.Errorf("bin should link to usr/bin: %+v", l)
	}
	if d := layer["tmp/"]; d == nil || d.Mode != 0o1777 {
		t.Errorf("tmp/: %+v", d)
	}
}

// TestDriverImageToolsRun unpacks the driver image and runs its programs
// chrooted into it: every library they need came along.
func TestDriverImageToolsRun(t *testing.T) {
	peer.Root(t)
	for _, p := range DriverTools {
		if _, err := hostbin.LookPath(p); err != nil {
			peer.Missing(t, p, "apt-get install e2fsprogs xfsprogs util-linux mount")
		}
	}
	if _, err := os.Stat("/bin/busybox"); err != nil {
		peer.Missing(t, "/bin/busybox", "apt-get install busybox-static")
	}
	dir := t.TempDir()
	drv := filepath.Join(dir, "qcow2-csi")
	build := exec.Command("go", "build", "-o", drv, "github.com/qcow2-csi/qcow2-csi/cmd/qcow2-csi")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	im, err := Driver(drv, "/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := im.WriteDockerArchive(&buf, "example.test/qcow2-csi:test"); err != nil {
		t.Fatal(err)
	}
	_, config, layer, data := readArchive(t, buf.Bytes())
	if ep := config["config"].(map[string]any)["Entrypoint"].([]any); len(ep) != 1 || ep[0] != "/usr/bin/qcow2-csi" {
		t.Errorf("Entrypoint %v", ep)
	}
	rootfs := filepath.Join(dir, "rootfs")
	for name, h := range layer {
		p := filepath.Join(rootfs, name)
		switch h.Typeflag {
		case tar.TypeDir:
			os.MkdirAll(p, os.FileMode(h.Mode).Perm())
		case tar.TypeSymlink:
			os.MkdirAll(filepath.Dir(p), 0o755)
			if err := os.Symlink(h.Linkname, p); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			os.MkdirAll(filepath.Dir(p), 0o755)
			if err := os.WriteFile(p, data[name], os.FileMode(h.Mode).Perm()); err != nil {
				t.Fatal(err)
			}
		}
	}
	runIn := func(args ...string) (string, error) {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: rootfs}
		cmd.Dir = "/"
		cmd.Env = im.Env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	checks := []struct {
		args []string
		want string
	}{
		{[]string{"/usr/bin/qcow2-csi", "version"}, "dev"},
		{[]string{"/sbin/mkfs.ext4", "-V"}, "mke2fs"},
		{[]string{"/sbin/mkfs.xfs", "-V"}, "mkfs.xfs version"},
		{[]string{"/sbin/xfs_growfs", "-V"}, "xfs_growfs version"},
		{[]string{"/sbin/resize2fs", "-h"}, "resize2fs"},
		{[]string{"/sbin/blkid", "-V"}, "blkid from util-linux"},
		{[]string{"/bin/mount", "-V"}, "mount from util-linux"},
		{[]string{"/sbin/losetup", "-V"}, "losetup from util-linux"},
		{[]string{"/bin/sh", "-c", "echo shell"}, "shell"},
	}
	for _, c := range checks {
		out, err := runIn(c.args...)
		// resize2fs -h exits 1 after printing its usage: judge it by its output.
		if !strings.Contains(out, c.want) || err != nil && c.args[0] != "/sbin/resize2fs" {
			t.Errorf("%v in the image: %v: %s", c.args, err, out)
		}
	}
}
