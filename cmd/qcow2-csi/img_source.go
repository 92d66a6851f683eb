package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// imgFile is an image opened by an img sub-command: qcow2 through the
// library, raw as a plain file.
type imgFile interface {
	io.ReaderAt
	Size() int64
	BlockStatus(off, n int64) ([]qcow2.Extent, error)
	Close() error
	Format() string
}

type qcowFile struct{ *qcow2.Image }

func (qcowFile) Format() string { return "qcow2" }

type rawFile struct {
	f    *os.File
	size int64
}

func (r *rawFile) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }
func (r *rawFile) Size() int64                             { return r.size }
func (r *rawFile) Close() error                            { return r.f.Close() }
func (r *rawFile) Format() string                          { return "raw" }

func (r *rawFile) BlockStatus(off, n int64) ([]qcow2.Extent, error) {
	return qcow2.FileExtents(r.f, off, min(n, r.size-off)), nil
}

// probeFormat returns "qcow2" when the file starts with the qcow2 magic, else
// "raw": what qemu-img and qemu-nbd do without -f.
func probeFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var b [4]byte
	if _, err := io.ReadFull(f, b[:]); err == nil && string(b[:]) == "QFI\xfb" {
		return "qcow2", nil
	}
	return "raw", nil
}

// openImg opens path as format ("" probes), read-only unless write.
// forceShare is qemu-img's -U (no locks).
func openImg(path, format string, write, forceShare bool) (imgFile, error) {
	return openImgRef(imageRef{path: path, format: format}, write, forceShare)
}

// openImgRef is openImg for an image argument that may carry a key
// (--image-opts ...,encrypt.key-secret=ID).
func openImgRef(ref imageRef, write, forceShare bool) (imgFile, error) {
	path, format := ref.path, ref.format
	if format == "" {
		var err error
		if format, err = probeFormat(path); err != nil {
			return nil, fmt.Errorf("Could not open '%s': %w", path, unwrapPathErr(err))
		}
	}
	switch format {
	case "qcow2":
		img, err := qcow2.Open(path, ref.openOptions(!write, forceShare))
		if err != nil {
			return nil, fmt.Errorf("Could not open '%s': %w", path, unwrapPathErr(err))
		}
		if img.Encrypted() && ref.passphrase == nil {
			// qemu-img refuses to open an encrypted image for data
			// without its key; so do we, before any read.
			img.Close()
			return nil, fmt.Errorf("Could not open '%s': %w", path, keyError(qcow2.ErrKeyRequired))
		}
		return qcowFile{img}, nil
	case "raw":
		flag := os.O_RDONLY
		if write {
			flag = os.O_RDWR
		}
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			return nil, fmt.Errorf("Could not open '%s': %w", path, unwrapPathErr(err))
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		return &rawFile{f: f, size: st.Size()}, nil
	}
	return nil, fmt.Errorf("Unknown driver '%s' (supported: qcow2, raw)", format)
}

func unwrapPathErr(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		s := pe.Err.Error()
		return errors.New(strings.ToUpper(s[:1]) + s[1:])
	}
	return err
}
