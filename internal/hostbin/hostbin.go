// Package hostbin finds programs on the build host and the shared libraries
// they need, so that the programs can be copied into a place that has no
// libraries of its own: the container image hack/image builds
// (hack/image/imagetar) and the initramfs of the VM tests
// (tests/vm/vmharness).
//
// Libraries come from ldd, as the host's dynamic loader resolves them: the
// target of every "name => /path (addr)" line and the bare "/path (addr)"
// line of the ELF interpreter. linux-vdso has no file and is skipped. A
// library ldd cannot find is an error: the program would not start where it
// is copied to.
package hostbin

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrNotFound is returned when a program asked for is not on the build host.
var ErrNotFound = errors.New("not found on this host")

// systemDirs are searched after $PATH, which may lack the sbin directories
// for a user other than root.
var systemDirs = []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin"}

// LookPath finds the executable name on $PATH or in the system directories.
func LookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range systemDirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("hostbin: program %q: %w (run hack/deps.sh)", name, ErrNotFound)
}

// Libraries returns the shared libraries and the ELF interpreter of the host
// file prog, in ldd's order; none for a statically linked program, and none
// for a file that is not ELF (a script: xfs_info and fsck.xfs are shell
// scripts, whose interpreter, /bin/sh, the caller provides).
func Libraries(prog string) ([]string, error) {
	out, err := exec.Command("ldd", prog).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) || bytes.Contains(out, []byte("statically linked")) {
			return nil, nil
		}
		return nil, fmt.Errorf("hostbin: ldd %s: %v: %s", prog, err, bytes.TrimSpace(out))
	}
	libs, err := parseLdd(out)
	if err != nil {
		return nil, fmt.Errorf("hostbin: ldd %s: %w", prog, err)
	}
	return libs, nil
}

// parseLdd returns the absolute library paths in ldd output.
func parseLdd(out []byte) ([]string, error) {
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.Contains(line, "statically linked") {
			continue
		}
		if strings.Contains(line, "not found") {
			return nil, fmt.Errorf("missing library: %s", line)
		}
		f := line
		if i := strings.Index(line, "=>"); i >= 0 {
			f = strings.TrimSpace(line[i+2:])
		}
		if i := strings.Index(f, " ("); i >= 0 {
			f = f[:i]
		}
		if strings.HasPrefix(f, "/") {
			libs = append(libs, f)
		}
	}
	return libs, sc.Err()
}

// Options say where CopyProgram puts what it copies.
type Options struct {
	// ProgramPath maps the program's host path to its path at the
	// destination; nil keeps the host path. Libraries keep their host
	// paths, which is where the program's ELF interpreter and the loader
	// look for them.
	ProgramPath func(host string) string
}

// CopyProgram looks name up with LookPath and calls add(dst, src) for the
// program and for each of its shared libraries.
func CopyProgram(name string, add func(dst, src string) error, o Options) error {
	src, err := LookPath(name)
	if err != nil {
		return err
	}
	dst := src
	if o.ProgramPath != nil {
		dst = o.ProgramPath(src)
	}
	if err := add(dst, src); err != nil {
		return err
	}
	return CopyLibraries(src, add)
}

// CopyLibraries calls add(path, path) for each shared library of the host
// ELF file src (see Libraries).
func CopyLibraries(src string, add func(dst, src string) error) error {
	libs, err := Libraries(src)
	if err != nil {
		return err
	}
	for _, l := range libs {
		if err := add(l, l); err != nil {
			return err
		}
	}
	return nil
}
