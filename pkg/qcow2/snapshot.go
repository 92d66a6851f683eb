package qcow2

import (
	"encoding/binary"
	"fmt"
)

// snapshotEntry is one entry of the internal snapshot table.
type snapshotEntry struct {
	L1TableOffset    uint64
	L1Size           uint32
	ID               string
	Name             string
	DateSec          uint32
	DateNsec         uint32
	VMClockNsec      uint64
	VMStateSize      uint32
	VMStateSizeLarge uint64 // extra data, 0 when absent
	DiskSize         uint64 // extra data; 0 when absent (then the image size applies)
	Icount           int64  // extra data; -1 when absent
	ExtraData        []byte // the whole extra data area, preserved verbatim
}

const snapshotFixedLen = 40

// decodeSnapshotTable parses n snapshot entries from buf (the bytes at the
// snapshot table offset). base is buf's file offset, for error messages.
// It returns the entries and the table's length in bytes.
func decodeSnapshotTable(buf []byte, n uint32, base int64, clusterBits uint32, fileSize int64) ([]snapshotEntry, int, error) {
	if n > maxSnapshots {
		return nil, 0, corruptf("nb_snapshots", hdrNbSnapshots, "%d exceeds limit %d", n, maxSnapshots)
	}
	be := binary.BigEndian
	out := make([]snapshotEntry, 0, min(int(n), len(buf)/snapshotFixedLen+1))
	off := 0
	cs := uint64(1) << clusterBits
	for i := uint32(0); i < n; i++ {
		at := base + int64(off)
		if off+snapshotFixedLen > len(buf) {
			return nil, 0, corruptf(fmt.Sprintf("snapshot[%d]", i), at, "entry runs past the end of the snapshot table")
		}
		e := buf[off:]
		s := snapshotEntry{
			L1TableOffset: be.Uint64(e[0:]),
			L1Size:        be.Uint32(e[8:]),
			DateSec:       be.Uint32(e[16:]),
			DateNsec:      be.Uint32(e[20:]),
			VMClockNsec:   be.Uint64(e[24:]),
			VMStateSize:   be.Uint32(e[32:]),
			Icount:        -1,
		}
		idLen := int(be.Uint16(e[12:]))
		nameLen := int(be.Uint16(e[14:]))
		extraLen := int(be.Uint32(e[36:]))
		if extraLen > maxSnapshotExtraData {
			return nil, 0, corruptf(fmt.Sprintf("snapshot[%d].extra_data_size", i), at+36, "%d exceeds limit %d", extraLen, maxSnapshotExtraData)
		}
		if uint64(s.L1Size)*8 > maxL1Bytes {
			return nil, 0, corruptf(fmt.Sprintf("snapshot[%d].l1_size", i), at+8, "%d exceeds limit %d", s.L1Size, maxL1Bytes/8)
		}
		if s.L1Size > 0 {
			if err := checkTable(fmt.Sprintf("snapshot[%d].l1_table_offset", i), at, s.L1TableOffset, uint64(s.L1Size)*8, cs, fileSize); err != nil {
				return nil, 0, err
			}
		}
		total := snapshotFixedLen + extraLen + idLen + nameLen
		if off+total > maxSnapshotsTableBytes {
			return nil, 0, corruptf("snapshot table", base, "snapshot table is too big: entry %d ends at byte %d, limit %d (qemu's)", i, off+total, maxSnapshotsTableBytes)
		}
		if off+total > len(buf) {
			return nil, 0, corruptf(fmt.Sprintf("snapshot[%d]", i), at, "entry of %d bytes runs past the end of the snapshot table", total)
		}
		x := e[snapshotFixedLen : snapshotFixedLen+extraLen]
		s.ExtraData = append([]byte(nil), x...)
		if len(x) >= 8 {
			s.VMStateSizeLarge = be.Uint64(x)
		}
		if len(x) >= 16 {
			s.DiskSize = be.Uint64(x[8:])
		}
		if len(x) >= 24 {
			s.Icount = int64(be.Uint64(x[16:]))
		}
		p := snapshotFixedLen + extraLen
		s.ID = string(e[p : p+idLen])
		s.Name = string(e[p+idLen : p+idLen+nameLen])
		off += (total + 7) &^ 7
		out = append(out, s)
	}
	if off > len(buf) {
		off = len(buf)
	}
	return out, off, nil
}

// encodeSnapshotTable is the inverse of decodeSnapshotTable.
func encodeSnapshotTable(snaps []snapshotEntry) []byte {
	be := binary.BigEndian
	var buf []byte
	for _, s := range snaps {
		extra := s.ExtraData
		if len(extra) < 16 {
			extra = make([]byte, 16)
			copy(extra, s.ExtraData)
			be.PutUint64(extra, s.VMStateSizeLarge)
			be.PutUint64(extra[8:], s.DiskSize)
		}
		var e [snapshotFixedLen]byte
		be.PutUint64(e[0:], s.L1TableOffset)
		be.PutUint32(e[8:], s.L1Size)
		be.PutUint16(e[12:], uint16(len(s.ID)))
		be.PutUint16(e[14:], uint16(len(s.Name)))
		be.PutUint32(e[16:], s.DateSec)
		be.PutUint32(e[20:], s.DateNsec)
		be.PutUint64(e[24:], s.VMClockNsec)
		be.PutUint32(e[32:], s.VMStateSize)
		be.PutUint32(e[36:], uint32(len(extra)))
		buf = append(buf, e[:]...)
		buf = append(buf, extra...)
		buf = append(buf, s.ID...)
		buf = append(buf, s.Name...)
		for len(buf)%8 != 0 {
			buf = append(buf, 0)
		}
	}
	return buf
}
