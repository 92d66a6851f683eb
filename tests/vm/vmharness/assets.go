//go:build linux

package vmharness

import (
	"archive/tar"
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// kernelMeta is the Debian meta-package whose dependency names the current
// kernel image package of the machine's release.
const kernelMeta = "linux-image-amd64"

// Assets are the unpacked kernel and busybox a VM boots from.
type Assets struct {
	// Kernel is the vmlinuz path.
	Kernel string
	// Release is the kernel release (the lib/modules directory name).
	Release string
	// ModulesDir is lib/modules/RELEASE of the unpacked package.
	ModulesDir string
	// Busybox is a static busybox binary.
	Busybox string

	mods    map[string]module
	builtin map[string]bool
}

// module is one loadable kernel module.
type module struct {
	name string
	path string // relative to ModulesDir
	deps []string
}

var (
	assetsOnce sync.Once
	assets     *Assets
	assetsErr  error
)

// CacheDir is the module root's .cache/vm (git rev-parse --show-toplevel of
// the checkout the tests run in, else the directory holding go.mod).
func CacheDir() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "vm"), nil
}

func moduleRoot() (string, error) {
	if out, err := exec.Command("git", "rev-parse", "--show-toplevel").Output(); err == nil {
		if r := strings.TrimSpace(string(out)); r != "" {
			if _, err := os.Stat(filepath.Join(r, "go.mod")); err == nil {
				return r, nil
			}
		}
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("vmharness: no go.mod above the working directory")
		}
		dir = parent
	}
}

// Fetch returns the kernel and busybox, downloading and unpacking them into
// the cache on first use. A missing apt-get or dpkg-deb stops the test the
// way tests/peer does (a failure under CI=true).
func Fetch(t testing.TB) *Assets {
	t.Helper()
	peer.Require(t, "apt-get")
	peer.Require(t, "apt-cache")
	peer.Require(t, "dpkg-deb")
	assetsOnce.Do(func() { assets, assetsErr = fetch() })
	if assetsErr != nil {
		t.Fatalf("vmharness: %v", assetsErr)
	}
	return assets
}

func fetch() (*Assets, error) {
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, err
	}
	// Several test processes (go test ./... runs packages in parallel) may
	// fill the cache at once: one does, the others wait.
	unlock, err := lockFile(filepath.Join(cache, "lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()

	kpkg, err := kernelPackage(cache)
	if err != nil {
		return nil, err
	}
	kdir := filepath.Join(cache, kpkg)
	if _, err := os.Stat(filepath.Join(kdir, ".done")); err != nil {
		if err := unpackKernel(cache, kpkg, kdir); err != nil {
			return nil, err
		}
	}
	bb := filepath.Join(cache, "busybox-static", "busybox")
	if _, err := os.Stat(bb); err != nil {
		if err := unpackBusybox(cache, bb); err != nil {
			return nil, err
		}
	}
	a := &Assets{Busybox: bb}
	rels, err := os.ReadDir(filepath.Join(kdir, "lib", "modules"))
	if err != nil || len(rels) != 1 {
		return nil, fmt.Errorf("vmharness: %s: expected one lib/modules/RELEASE directory (%v)", kdir, err)
	}
	a.Release = rels[0].Name()
	a.ModulesDir = filepath.Join(kdir, "lib", "modules", a.Release)
	a.Kernel = filepath.Join(kdir, "boot", "vmlinuz-"+a.Release)
	if err := a.loadIndex(); err != nil {
		return nil, err
	}
	return a, nil
}

// kernelPackage resolves linux-image-amd64 to the versioned image package
// (e.g. linux-image-6.1.0-48-amd64). Offline, it falls back to the newest
// kernel already in the cache.
func kernelPackage(cache string) (string, error) {
	pkg, err := resolveKernelMeta()
	if pkg == "" && os.Geteuid() == 0 {
		// A fresh machine may have no package lists yet.
		if uerr := exec.Command("apt-get", "update", "-qq").Run(); uerr == nil {
			pkg, err = resolveKernelMeta()
		}
	}
	if pkg != "" {
		return pkg, nil
	}
	cached, _ := filepath.Glob(filepath.Join(cache, "linux-image-*", ".done"))
	if len(cached) > 0 {
		sort.Strings(cached)
		return filepath.Base(filepath.Dir(cached[len(cached)-1])), nil
	}
	return "", fmt.Errorf("vmharness: cannot resolve %s with apt-cache (%v); run `apt-get update`", kernelMeta, err)
}

func resolveKernelMeta() (string, error) {
	out, err := exec.Command("apt-cache", "depends", kernelMeta).Output()
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("apt-cache depends %s names no linux-image package", kernelMeta)
}

// download fetches one package's .deb into dir and returns its path.
func download(dir, pkg string) (string, error) {
	cmd := exec.Command("apt-get", "download", "-q", pkg)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("vmharness: apt-get download %s: %v\n%s(run `apt-get update` if the package is not found)", pkg, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("vmharness: apt-get download %s left %d .deb files", pkg, len(debs))
	}
	return debs[0], nil
}

// extractDeb streams the .deb's file tree (dpkg-deb --fsys-tarfile) and
// writes the members keep selects under dst.
func extractDeb(deb, dst string, keep func(name string) bool) error {
	cmd := exec.Command("dpkg-deb", "--fsys-tarfile", deb)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	tr := tar.NewReader(stdout)
	var terr error
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			terr = err
			break
		}
		name := path.Clean(strings.TrimPrefix(h.Name, "./"))
		if h.Typeflag != tar.TypeReg || !keep(name) || strings.HasPrefix(name, "..") {
			continue
		}
		p := filepath.Join(dst, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			terr = err
			break
		}
		f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode)&0o755|0o600)
		if err != nil {
			terr = err
			break
		}
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			terr = err
			break
		}
	}
	_, _ = io.Copy(io.Discard, stdout)
	if err := cmd.Wait(); err != nil && terr == nil {
		terr = fmt.Errorf("dpkg-deb --fsys-tarfile %s: %v: %s", deb, err, stderr.String())
	}
	return terr
}

// unpackKernel downloads the kernel package and keeps vmlinuz, the modules
// and modules.builtin, then indexes the modules' dependencies.
func unpackKernel(cache, pkg, kdir string) error {
	tmp, err := os.MkdirTemp(cache, "tmp-kernel-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	deb, err := download(tmp, pkg)
	if err != nil {
		return err
	}
	tree := filepath.Join(tmp, "tree")
	err = extractDeb(deb, tree, func(n string) bool {
		return strings.HasPrefix(n, "boot/vmlinuz-") ||
			(strings.HasPrefix(n, "lib/modules/") && (strings.HasSuffix(n, ".ko") || strings.HasSuffix(n, "/modules.builtin")))
	})
	if err != nil {
		return fmt.Errorf("vmharness: unpack %s: %w", pkg, err)
	}
	rels, err := os.ReadDir(filepath.Join(tree, "lib", "modules"))
	if err != nil || len(rels) != 1 {
		return fmt.Errorf("vmharness: %s has no single lib/modules/RELEASE (%v)", pkg, err)
	}
	if err := writeIndex(filepath.Join(tree, "lib", "modules", rels[0].Name())); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tree, ".done"), nil, 0o644); err != nil {
		return err
	}
	os.RemoveAll(kdir)
	return os.Rename(tree, kdir)
}

func unpackBusybox(cache, dst string) error {
	tmp, err := os.MkdirTemp(cache, "tmp-busybox-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	deb, err := download(tmp, "busybox-static")
	if err != nil {
		return err
	}
	if err := extractDeb(deb, tmp, func(n string) bool { return n == "bin/busybox" }); err != nil {
		return fmt.Errorf("vmharness: unpack busybox-static: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.Rename(filepath.Join(tmp, "bin", "busybox"), dst)
}

// indexName is our modules.dep: one module per line, "name relpath deps".
// The package ships no modules.dep (depmod writes it at install time).
const indexName = "vmharness.modindex"

// writeIndex reads every module's .modinfo "depends=" once.
func writeIndex(modDir string) error {
	var lines []string
	err := filepath.WalkDir(modDir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return err
		}
		deps, err := modDepends(p)
		if err != nil {
			return fmt.Errorf("vmharness: %s: %w", p, err)
		}
		rel, _ := filepath.Rel(modDir, p)
		dep := strings.Join(deps, ",")
		if dep == "" {
			dep = "-"
		}
		lines = append(lines, modName(p)+" "+filepath.ToSlash(rel)+" "+dep)
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(lines)
	return os.WriteFile(filepath.Join(modDir, indexName), []byte(strings.Join(lines, "\n")+"\n"), 0o644)
}

func modName(p string) string {
	return strings.ReplaceAll(strings.TrimSuffix(filepath.Base(p), ".ko"), "-", "_")
}

func modDepends(p string) ([]string, error) {
	f, err := elf.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	s := f.Section(".modinfo")
	if s == nil {
		return nil, errors.New("no .modinfo section")
	}
	b, err := s.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}

func (a *Assets) loadIndex() error {
	b, err := os.ReadFile(filepath.Join(a.ModulesDir, indexName))
	if err != nil {
		return fmt.Errorf("vmharness: module index: %w", err)
	}
	a.mods = map[string]module{}
	for _, ln := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(ln)
		if len(f) != 3 {
			return fmt.Errorf("vmharness: module index: bad line %q", ln)
		}
		m := module{name: f[0], path: f[1]}
		if f[2] != "-" {
			m.deps = strings.Split(f[2], ",")
		}
		a.mods[m.name] = m
	}
	a.builtin = map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(a.ModulesDir, "modules.builtin")); err == nil {
		for _, ln := range strings.Fields(string(b)) {
			a.builtin[modName(ln)] = true
		}
	}
	return nil
}

// resolve orders the named modules and everything they depend on so that
// each comes after its dependencies. Built-in modules are skipped.
func (a *Assets) resolve(names []string) ([]module, error) {
	var out []module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(n string, from string) error
	visit = func(n, from string) error {
		n = strings.ReplaceAll(n, "-", "_")
		switch state[n] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("vmharness: module dependency cycle at %s", n)
		}
		m, ok := a.mods[n]
		if !ok {
			if a.builtin[n] {
				state[n] = 2
				return nil
			}
			if from != "" {
				return fmt.Errorf("vmharness: module %s (needed by %s) is not in kernel %s", n, from, a.Release)
			}
			return fmt.Errorf("vmharness: module %s is not in kernel %s", n, a.Release)
		}
		state[n] = 1
		for _, d := range m.deps {
			if err := visit(d, n); err != nil {
				return err
			}
		}
		state[n] = 2
		out = append(out, m)
		return nil
	}
	for _, n := range names {
		if err := visit(n, ""); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func lockFile(p string) (func(), error) {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}
