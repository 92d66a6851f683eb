// Package imagetar builds container images as docker-archive tarballs (the
// `docker save` format that `ctr images import` and `docker load` read)
// without a container engine: one layer made from files of the build host.
//
// The e2e suite and `make image` use it to package the statically linked
// qcow2-csi binary with the Debian filesystem tools it calls (mkfs, fsck,
// resize2fs, xfs_growfs, mount, blkid, ...) and their shared libraries, as
// listed by ldd (internal/hostbin, which the VM harness shares). Output is
// deterministic: entries sorted, owner root, mtime 0, so the same inputs
// give the same image ID.
package imagetar

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/qcow2-csi/qcow2-csi/internal/hostbin"
)

type entry struct {
	typ    byte   // tar.TypeReg, tar.TypeDir, tar.TypeSymlink
	src    string // host file for TypeReg with no data
	data   []byte // content for TypeReg when src is empty
	target string // TypeSymlink
	mode   int64
}

// Image is a single-layer image being assembled. Paths are absolute paths
// inside the image.
type Image struct {
	entries map[string]entry
	// Entrypoint and Env go into the image config.
	Entrypoint []string
	Env        []string
}

// New returns an image whose root has the Debian usr-merged layout (/bin,
// /sbin, /lib, /lib64 pointing into /usr), so files copied from a Debian 12
// host keep working at the paths their programs and ELF interpreters name.
func New() *Image {
	im := &Image{entries: map[string]entry{}, Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}}
	for _, d := range []string{"/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/etc", "/tmp", "/proc", "/sys", "/dev", "/run"} {
		im.AddDir(d, 0o755)
	}
	im.entries["/tmp"] = entry{typ: tar.TypeDir, mode: 0o1777}
	for _, l := range []string{"bin", "sbin", "lib", "lib64"} {
		im.AddSymlink("/"+l, "usr/"+l)
	}
	im.AddData("/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"), 0o644)
	im.AddData("/etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
	return im
}

// usrPath maps a host path under /bin, /sbin, /lib or /lib64 to its usr-merged
// location, so the image holds one copy under /usr.
func usrPath(p string) string {
	p = path.Clean(p)
	for _, top := range []string{"/bin/", "/sbin/", "/lib/", "/lib64/"} {
		if strings.HasPrefix(p, top) {
			return "/usr" + p
		}
	}
	return p
}

func (im *Image) addParents(p string) {
	for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
		if _, ok := im.entries[d]; !ok {
			im.entries[d] = entry{typ: tar.TypeDir, mode: 0o755}
		}
	}
}

// AddDir adds a directory.
func (im *Image) AddDir(p string, mode int64) {
	p = usrPath(p)
	im.addParents(p)
	im.entries[p] = entry{typ: tar.TypeDir, mode: mode}
}

// AddSymlink adds a symbolic link at p pointing to target.
func (im *Image) AddSymlink(p, target string) {
	p = path.Clean(p)
	im.addParents(p)
	im.entries[p] = entry{typ: tar.TypeSymlink, target: target}
}

// AddData adds a regular file with the given content.
func (im *Image) AddData(p string, data []byte, mode int64) {
	p = usrPath(p)
	im.addParents(p)
	im.entries[p] = entry{typ: tar.TypeReg, data: data, mode: mode}
}

// AddFile copies the host file src (symlinks followed) to p in the image.
func (im *Image) AddFile(p, src string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("imagetar: add %s: %w", p, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("imagetar: add %s: %s is not a regular file", p, src)
	}
	p = usrPath(p)
	im.addParents(p)
	im.entries[p] = entry{typ: tar.TypeReg, src: src, mode: int64(fi.Mode().Perm())}
	return nil
}

// AddProgram copies the host program name (looked up with hostbin.LookPath)
// to /usr/sbin or /usr/bin (where the host has it) together with the shared
// libraries and ELF interpreter ldd lists for it.
func (im *Image) AddProgram(name string) error {
	return hostbin.CopyProgram(name, im.AddFile, hostbin.Options{ProgramPath: func(src string) string {
		if dst := usrPath(src); strings.HasPrefix(dst, "/usr/") {
			return dst
		}
		return "/usr/bin/" + name
	}})
}

// AddLibraries adds the shared libraries of the host ELF file src, as ldd
// resolves them. A statically linked file, or a script (not ELF), adds
// nothing: a script's interpreter is the image's /bin/sh.
func (im *Image) AddLibraries(src string) error {
	return hostbin.CopyLibraries(src, im.AddFile)
}

// tarLayer writes the layer tarball, entries sorted by path.
func (im *Image) tarLayer(w io.Writer) error {
	names := make([]string, 0, len(im.entries))
	for n := range im.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	tw := tar.NewWriter(w)
	for _, n := range names {
		e := im.entries[n]
		h := &tar.Header{Name: strings.TrimPrefix(n, "/"), Typeflag: e.typ, Mode: e.mode, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		var body io.Reader
		switch e.typ {
		case tar.TypeDir:
			h.Name += "/"
		case tar.TypeSymlink:
			h.Linkname = e.target
			h.Mode = 0o777
		case tar.TypeReg:
			if e.src == "" {
				h.Size = int64(len(e.data))
				body = bytes.NewReader(e.data)
			} else {
				f, err := os.Open(e.src)
				if err != nil {
					return fmt.Errorf("imagetar: %s: %w", n, err)
				}
				defer f.Close()
				fi, err := f.Stat()
				if err != nil {
					return err
				}
				h.Size = fi.Size()
				body = f
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("imagetar: %s: %w", n, err)
		}
		if body != nil {
			if n, err := io.Copy(tw, body); err != nil || n != h.Size {
				return fmt.Errorf("imagetar: copy %s: %d of %d bytes: %v", h.Name, n, h.Size, err)
			}
		}
	}
	return tw.Close()
}

// WriteDockerArchive writes the image as a docker-archive tarball tagged ref
// (for example "ghcr.io/qcow2-csi/qcow2-csi:e2e") to out. It returns the
// image ID (the config digest).
func (im *Image) WriteDockerArchive(out io.Writer, ref string) (string, error) {
	var layer bytes.Buffer
	if err := im.tarLayer(&layer); err != nil {
		return "", err
	}
	diff := sha256.Sum256(layer.Bytes())
	diffHex := hex.EncodeToString(diff[:])
	epoch := "1970-01-01T00:00:00Z"
	cfg := map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      epoch,
		"config":       map[string]any{"Entrypoint": im.Entrypoint, "Env": im.Env, "WorkingDir": "/"},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + diffHex}},
		"history":      []map[string]string{{"created": epoch, "created_by": "qcow2-csi hack/image"}},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return "", err
	}
	cfgSum := sha256.Sum256(cfgJSON)
	cfgName := hex.EncodeToString(cfgSum[:]) + ".json"
	manifest, err := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{ref}, "Layers": []string{diffHex + "/layer.tar"}}})
	if err != nil {
		return "", err
	}
	tw := tar.NewWriter(out)
	for _, f := range []struct {
		name string
		data []byte
	}{{"manifest.json", manifest}, {cfgName, cfgJSON}, {diffHex + "/layer.tar", layer.Bytes()}} {
		if dir := path.Dir(f.name); dir != "." {
			if err := tw.WriteHeader(&tar.Header{Name: dir + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
				return "", err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(f.data)), ModTime: time.Unix(0, 0)}); err != nil {
			return "", err
		}
		if _, err := tw.Write(f.data); err != nil {
			return "", err
		}
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(cfgSum[:]), nil
}

// WriteFile writes the docker archive to the file name, atomically.
func (im *Image) WriteFile(name, ref string) (string, error) {
	tmp := name + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return "", err
	}
	id, err := im.WriteDockerArchive(f, ref)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return "", err
	}
	return id, os.Rename(tmp, name)
}
