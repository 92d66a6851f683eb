package qcow2

import (
	"bytes"
	"compress/flate"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
)

var zstdDecoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
	if err != nil {
		return nil
	}
	return d
}}

// decompressCluster inflates one compressed cluster from src into dst
// (len clusterSize). qemu stores zlib clusters as raw deflate and zstd
// clusters as one or more zstd frames; trailing bytes up to the sector end
// are padding.
func decompressCluster(ctype uint8, src, dst []byte) error {
	switch ctype {
	case CompressionZlib:
		r := flate.NewReader(bytes.NewReader(src))
		defer r.Close()
		if _, err := io.ReadFull(r, dst); err != nil {
			return fmt.Errorf("%w: zlib compressed cluster: %v", ErrCorrupt, err)
		}
		return nil
	case CompressionZstd:
		d, _ := zstdDecoders.Get().(*zstd.Decoder)
		if d == nil {
			return fmt.Errorf("%w: zstd decoder unavailable", ErrUnsupported)
		}
		defer zstdDecoders.Put(d)
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			return fmt.Errorf("%w: zstd compressed cluster: %v", ErrCorrupt, err)
		}
		if _, err := io.ReadFull(d, dst); err != nil {
			return fmt.Errorf("%w: zstd compressed cluster: %v", ErrCorrupt, err)
		}
		return nil
	}
	return fmt.Errorf("%w: compression type %d", ErrUnsupported, ctype)
}

// compressCluster deflates src the way qemu does; it returns nil when the
// result would not be smaller than the cluster (qemu then stores it plain).
func compressCluster(ctype uint8, src []byte) ([]byte, error) {
	var buf bytes.Buffer
	var w io.WriteCloser
	var err error
	switch ctype {
	case CompressionZlib:
		w, err = flate.NewWriter(&buf, flate.DefaultCompression)
	case CompressionZstd:
		w, err = zstd.NewWriter(&buf, zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false))
	default:
		return nil, fmt.Errorf("%w: compression type %d", ErrUnsupported, ctype)
	}
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(src); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	if buf.Len() >= len(src) {
		return nil, nil
	}
	return buf.Bytes(), nil
}
