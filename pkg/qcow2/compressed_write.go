package qcow2

import (
	"fmt"
)

// WriteCompressed writes whole clusters compressed with the image's
// compression type, as qemu-img convert -c does. off and len(p) must be
// cluster aligned (the last cluster may end at the disk end) and the
// clusters must be unallocated; clusters that do not compress are written
// normally.
func (img *Image) WriteCompressed(p []byte, off int64) (int, error) {
	cs := img.clusterSize
	if off%cs != 0 || (int64(len(p))%cs != 0 && off+int64(len(p)) != img.Size()) {
		return 0, fmt.Errorf("%w: compressed writes must be whole clusters (offset %d, length %d)", ErrInvalidOption, off, len(p))
	}
	if img.crypto != nil {
		return 0, fmt.Errorf("%w: compression is not supported on encrypted images", ErrUnsupported)
	}
	if err := img.startWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	defer img.drain.RUnlock()
	tok := img.ranges.lock(off, alignUp(off+int64(len(p)), cs), true)
	defer img.ranges.unlock(tok)
	for done := int64(0); done < int64(len(p)); done += cs {
		chunk := p[done:min(int64(len(p)), done+cs)]
		full := chunk
		if int64(len(chunk)) < cs {
			full = make([]byte, cs)
			copy(full, chunk)
		}
		z, err := compressCluster(img.hdr.CompressionType, full)
		if err != nil {
			return int(done), err
		}
		if z == nil {
			if err := img.writeRange(chunk, off+done); err != nil {
				return int(done), err
			}
			continue
		}
		if err := img.writeCompressedCluster((off+done)>>img.clusterBits, z); err != nil {
			return int(done), err
		}
	}
	return len(p), nil
}

// writeCompressedCluster stores compressed data for guest cluster vc,
// packing it after the previous compressed cluster when it fits.
func (img *Image) writeCompressedCluster(vc int64, z []byte) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	e, _, err := img.getL2(vc)
	if err != nil {
		return err
	}
	if e != 0 {
		return fmt.Errorf("%w: compressed write to allocated guest cluster %d", ErrInvalidOption, vc)
	}
	cs := img.clusterSize
	n := int64(len(z))
	var host int64
	if c := img.compCursor; c != 0 && c%cs != 0 && c%cs+n <= cs {
		host = c
		if _, err := img.addRefcount(c>>img.clusterBits, 1); err != nil {
			return err
		}
	} else {
		k := (n + cs - 1) / cs
		if host, err = img.allocClusters(k); err != nil {
			return err
		}
	}
	if err := img.checkOverlap(host, n, 0); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(z, host); err != nil {
		return ioErr("write compressed data", err)
	}
	img.compCursor = alignUp(host+n, 512)
	x := 62 - (img.clusterBits - 8)
	nsec := uint64((host+n-1)>>9 - host>>9)
	le := l2Entry(oflagCompressed | uint64(host) | nsec<<x)
	if err := img.setL2(vc, le, 0); err != nil {
		return img.fail(err)
	}
	for _, h := range img.writeHooks {
		h(vc<<img.clusterBits, cs)
	}
	return nil
}
