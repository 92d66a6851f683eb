//go:build linux

package vmharness

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
)

// cpioWriter writes an uncompressed "newc" cpio archive, the format the
// kernel unpacks as an initramfs. Parent directories are added on demand.
type cpioWriter struct {
	w    *bufio.Writer
	ino  uint32
	seen map[string]bool
	err  error
}

func newCPIO(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriterSize(w, 1<<20), seen: map[string]bool{}}
}

const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeLink = 0o120000
)

func (c *cpioWriter) header(name string, mode uint32, size int64) {
	if c.err != nil {
		return
	}
	c.ino++
	// 13 eight-digit hex fields: ino mode uid gid nlink mtime filesize
	// devmajor devminor rdevmajor rdevminor namesize check.
	_, c.err = fmt.Fprintf(c.w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	if c.err == nil {
		_, c.err = c.w.WriteString(name + "\x00")
	}
	c.pad(int64(6 + 13*8 + len(name) + 1))
}

func (c *cpioWriter) pad(n int64) {
	if c.err != nil {
		return
	}
	if r := n % 4; r != 0 {
		_, c.err = c.w.Write(make([]byte, 4-r))
	}
}

// clean turns an absolute guest path into the archive's relative form.
func clean(p string) string { return strings.TrimPrefix(path.Clean("/"+p), "/") }

func (c *cpioWriter) mkdirAll(p string) {
	p = clean(p)
	if p == "" || p == "." || c.seen[p] {
		return
	}
	c.mkdirAll(path.Dir(p))
	c.seen[p] = true
	c.header(p, modeDir|0o755, 0)
}

func (c *cpioWriter) bytes(p string, mode uint32, data []byte) {
	p = clean(p)
	if c.seen[p] {
		return
	}
	c.mkdirAll(path.Dir(p))
	c.seen[p] = true
	c.header(p, modeReg|mode, int64(len(data)))
	if c.err == nil {
		_, c.err = c.w.Write(data)
	}
	c.pad(int64(len(data)))
}

// file copies the host file src (symlinks followed) to guest path p.
func (c *cpioWriter) file(p, src string) {
	if c.err != nil || c.seen[clean(p)] {
		return
	}
	f, err := os.Open(src)
	if err != nil {
		c.err = err
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		c.err = err
		return
	}
	p = clean(p)
	c.mkdirAll(path.Dir(p))
	c.seen[p] = true
	c.header(p, modeReg|uint32(st.Mode().Perm()), st.Size())
	if c.err == nil {
		var n int64
		n, c.err = io.Copy(c.w, f)
		if c.err == nil && n != st.Size() {
			c.err = fmt.Errorf("%s changed size while archived", src)
		}
	}
	c.pad(st.Size())
}

func (c *cpioWriter) symlink(p, target string) {
	p = clean(p)
	if c.seen[p] {
		return
	}
	c.mkdirAll(path.Dir(p))
	c.seen[p] = true
	c.header(p, modeLink|0o777, int64(len(target)))
	if c.err == nil {
		_, c.err = c.w.WriteString(target)
	}
	c.pad(int64(len(target)))
}

func (c *cpioWriter) close() error {
	c.header("TRAILER!!!", 0, 0)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}
