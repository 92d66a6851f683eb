package qcow2

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// resolveBacking turns the backing file name stored in an image into a path
// the way qemu does for local files: absolute names are used as is,
// relative ones are relative to the directory of the image that names them
// (not to the current directory).
func resolveBacking(imagePath, name string) (string, error) {
	if name == "" {
		return "", nil
	}
	if strings.HasPrefix(name, "json:") || (strings.Contains(name, ":") && !strings.HasPrefix(name, "/") && !strings.HasPrefix(name, "file:") && protocolPrefix(name)) {
		return "", unsupportedf("backing_file", hdrBackingFileOffset, "backing file %q uses a protocol; only local files are supported", name)
	}
	name = strings.TrimPrefix(name, "file:")
	return CombineBackingPath(imagePath, name), nil
}

// protocolPrefix reports whether name starts like "proto:" (qemu treats a
// colon before any slash as a protocol prefix).
func protocolPrefix(name string) bool {
	i := strings.IndexByte(name, ':')
	j := strings.IndexByte(name, '/')
	return i > 0 && (j < 0 || i < j)
}

func openBacking(img *Image, opts OpenOptions, depth int) (layer, error) {
	path, err := resolveBacking(img.path, img.hdr.BackingFile)
	if err != nil {
		return nil, err
	}
	format := img.hdr.BackingFormat
	if format == "" {
		format, err = probeFormat(path)
		if err != nil {
			return nil, err
		}
	}
	bopts := opts
	bopts.ReadOnly = true
	switch format {
	case "qcow2":
		b, err := openImage(path, bopts, depth+1)
		if err != nil {
			return nil, fmt.Errorf("qcow2: backing file %q: %w", path, err)
		}
		return b, nil
	case "raw", "file":
		return openRaw(path, bopts)
	}
	return nil, unsupportedf("backing_format", -1, "backing format %q of %q is not supported (qcow2 and raw are)", format, path)
}

func probeFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("qcow2: backing file: %w", err)
	}
	defer f.Close()
	var b [4]byte
	if _, err := io.ReadFull(f, b[:]); err == nil && b == [4]byte{'Q', 'F', 'I', 0xfb} {
		return "qcow2", nil
	}
	return "raw", nil
}

// rawLayer is a raw backing file.
type rawLayer struct {
	f    *os.File
	path string
	size int64
	lock *imageLock
}

func openRaw(path string, opts OpenOptions) (*rawLayer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("qcow2: backing file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("qcow2: backing file: %w", err)
	}
	r := &rawLayer{f: f, path: path, size: st.Size()}
	if !opts.NoLock && st.Mode().IsRegular() {
		if r.lock, err = lockImage(f, false); err != nil {
			f.Close()
			return nil, fmt.Errorf("qcow2: backing file %q: %w", path, err)
		}
	}
	return r, nil
}

func (r *rawLayer) readAt(p []byte, off int64) error {
	if off >= r.size {
		clear(p)
		return nil
	}
	n, err := r.f.ReadAt(p[:min(int64(len(p)), r.size-off)], off)
	clear(p[n:])
	if err != nil && !errors.Is(err, io.EOF) {
		return ioErr("read backing file", err)
	}
	return nil
}

func (r *rawLayer) blockStatus(off, n int64, depth int) ([]Extent, error) {
	var out []Extent
	if off < r.size {
		l := min(n, r.size-off)
		for _, s := range hostSegments(r.f, off, l, nil) {
			out = append(out, Extent{Start: s.off, Length: s.n, Depth: depth, Present: true, Data: !s.hole, Zero: s.hole, Offset: s.off, Filename: r.path})
		}
	}
	if off+n > r.size {
		s := max(off, r.size)
		out = append(out, backingBeyondEnd(s, off+n-s, depth))
	}
	return out, nil
}

func (r *rawLayer) virtualSize() int64 { return r.size }
func (r *rawLayer) describe() (string, string) {
	return r.path, "raw"
}
func (r *rawLayer) close() error {
	if r.lock != nil {
		r.lock.release()
	}
	return r.f.Close()
}
