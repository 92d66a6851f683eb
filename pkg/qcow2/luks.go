package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// LUKS1 on-disk header (cryptsetup's LUKS1 on-disk format 1.2, as QEMU's
// crypto/block-luks.c writes it). Inside a qcow2 image the header lives in
// host clusters named by the full disk encryption header extension: the
// 592-byte header at the start of that region, then the key material of
// the eight key slots, each aligned to 4 KiB. The region is the LUKS
// "payload offset" long; the payload itself is not there: qcow2 encrypts
// its data clusters where they lie (luks_image.go). All integers are
// big-endian.
const (
	luksMagic = "LUKS\xba\xbe"

	luksOffVersion      = 6
	luksOffCipherName   = 8
	luksOffCipherMode   = 40
	luksOffHashSpec     = 72
	luksOffPayload      = 104
	luksOffKeyBytes     = 108
	luksOffMKDigest     = 112
	luksOffMKDigestSalt = 132
	luksOffMKDigestIter = 164
	luksOffUUID         = 168
	luksOffSlots        = 208
	luksSlotLen         = 48
	luksHeaderLen       = luksOffSlots + luksSlots*luksSlotLen // 592

	luksNameLen   = 32
	luksUUIDLen   = 40
	luksDigestLen = 20
	luksSaltLen   = 32
	luksSlots     = 8
	luksStripes   = 4000

	luksSlotEnabled  = 0x00ac71f3
	luksSlotDisabled = 0x0000dead

	// luksSectorSize is the unit of both the key material and the
	// encrypted data: 512 bytes, each with its own XTS tweak.
	luksSectorSize = 512
	// luksAlign aligns the key material of each slot (QEMU's and
	// cryptsetup's 4 KiB).
	luksAlign = 4096
	// luksMinIters is the least number of PBKDF2 iterations QEMU writes
	// for a key slot and for the master key digest.
	luksMinIters = 1000
)

// luksKeySlot is one of the eight key slots.
type luksKeySlot struct {
	Active     uint32 // luksSlotEnabled or luksSlotDisabled
	Iterations uint32
	Salt       [luksSaltLen]byte
	KeyOffset  uint32 // sectors from the start of the LUKS header
	Stripes    uint32
}

func (s *luksKeySlot) enabled() bool { return s.Active == luksSlotEnabled }

// luksHeader is the decoded LUKS1 header.
type luksHeader struct {
	Version       uint16
	CipherName    string // "aes"
	CipherMode    string // "xts-plain64"
	HashSpec      string // "sha256"
	PayloadOffset uint32 // sectors: the length of the header region
	KeyBytes      uint32 // master key length (64 for aes-256-xts)
	MKDigest      [luksDigestLen]byte
	MKDigestSalt  [luksSaltLen]byte
	MKDigestIter  uint32
	UUID          string
	Slots         [luksSlots]luksKeySlot
}

// luksField reads a NUL-terminated name field; LUKS requires the NUL.
func luksField(buf []byte, off, n int, field string, base int64) (string, error) {
	b := buf[off : off+n]
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return "", corruptf("luks "+field, base+int64(off), "is not NUL-terminated within %d bytes", n)
	}
	return string(b[:i]), nil
}

// decodeLUKSHeader parses and validates the LUKS header at the start of
// buf. base is the file offset of the header (for error messages) and
// regionLen the length of the header region the qcow2 extension declares:
// every key slot's material must lie inside it.
func decodeLUKSHeader(buf []byte, base, regionLen int64) (*luksHeader, error) {
	if len(buf) < luksHeaderLen {
		return nil, corruptf("luks header", base, "is %d bytes, shorter than %d", len(buf), luksHeaderLen)
	}
	if string(buf[:len(luksMagic)]) != luksMagic {
		return nil, corruptf("luks magic", base, "%q is not the LUKS magic", buf[:len(luksMagic)])
	}
	be := binary.BigEndian
	h := &luksHeader{Version: be.Uint16(buf[luksOffVersion:])}
	if h.Version != 1 {
		return nil, unsupportedf("luks version", base+luksOffVersion, "%d is not 1 (LUKS2 is not supported)", h.Version)
	}
	var err error
	if h.CipherName, err = luksField(buf, luksOffCipherName, luksNameLen, "cipher_name", base); err != nil {
		return nil, err
	}
	if h.CipherMode, err = luksField(buf, luksOffCipherMode, luksNameLen, "cipher_mode", base); err != nil {
		return nil, err
	}
	if h.HashSpec, err = luksField(buf, luksOffHashSpec, luksNameLen, "hash_spec", base); err != nil {
		return nil, err
	}
	if h.UUID, err = luksField(buf, luksOffUUID, luksUUIDLen, "uuid", base); err != nil {
		return nil, err
	}
	h.PayloadOffset = be.Uint32(buf[luksOffPayload:])
	h.KeyBytes = be.Uint32(buf[luksOffKeyBytes:])
	copy(h.MKDigest[:], buf[luksOffMKDigest:])
	copy(h.MKDigestSalt[:], buf[luksOffMKDigestSalt:])
	h.MKDigestIter = be.Uint32(buf[luksOffMKDigestIter:])
	for i := range h.Slots {
		p := buf[luksOffSlots+i*luksSlotLen:]
		s := &h.Slots[i]
		s.Active = be.Uint32(p)
		s.Iterations = be.Uint32(p[4:])
		copy(s.Salt[:], p[8:])
		s.KeyOffset = be.Uint32(p[40:])
		s.Stripes = be.Uint32(p[44:])
	}
	return h, h.validate(base, regionLen)
}

// validate checks what can be checked without a passphrase, as QEMU's
// qcrypto_block_luks_check_header does, and that nothing points outside
// the region the qcow2 header gives the LUKS header.
func (h *luksHeader) validate(base, regionLen int64) error {
	if h.CipherName != "aes" {
		return unsupportedf("luks cipher_name", base+luksOffCipherName, "cipher %q is not supported (aes)", h.CipherName)
	}
	if h.CipherMode != "xts-plain64" {
		return unsupportedf("luks cipher_mode", base+luksOffCipherMode, "cipher mode %q is not supported (xts-plain64)", h.CipherMode)
	}
	if _, err := luksHash(h.HashSpec); err != nil {
		return unsupportedf("luks hash_spec", base+luksOffHashSpec, "%v", err)
	}
	if h.KeyBytes != 32 && h.KeyBytes != 64 {
		return corruptf("luks key_bytes", base+luksOffKeyBytes, "%d is not 32 or 64 (aes-128-xts or aes-256-xts)", h.KeyBytes)
	}
	if h.MKDigestIter == 0 {
		return corruptf("luks mk_digest_iterations", base+luksOffMKDigestIter, "is 0")
	}
	if int64(h.PayloadOffset)*luksSectorSize > regionLen {
		return corruptf("luks payload_offset", base+luksOffPayload, "%d sectors exceeds the %d-byte header region", h.PayloadOffset, regionLen)
	}
	material := h.materialLen()
	for i := range h.Slots {
		s := &h.Slots[i]
		at := base + luksOffSlots + int64(i*luksSlotLen)
		if s.Active != luksSlotEnabled && s.Active != luksSlotDisabled {
			return corruptf(fmt.Sprintf("luks key slot %d active", i), at, "%#x is neither enabled (%#x) nor disabled (%#x)", s.Active, luksSlotEnabled, luksSlotDisabled)
		}
		if s.Stripes != luksStripes {
			return corruptf(fmt.Sprintf("luks key slot %d stripes", i), at+44, "%d is not %d", s.Stripes, luksStripes)
		}
		start := int64(s.KeyOffset) * luksSectorSize
		if start < luksHeaderLen || start > regionLen || material > regionLen-start {
			return corruptf(fmt.Sprintf("luks key slot %d key_offset", i), at+40, "key material at sector %d (%d bytes) lies outside the %d-byte header region or over the header", s.KeyOffset, material, regionLen)
		}
		if s.enabled() && s.Iterations == 0 {
			return corruptf(fmt.Sprintf("luks key slot %d iterations", i), at+4, "is 0")
		}
		for j := range i {
			o := int64(h.Slots[j].KeyOffset) * luksSectorSize
			if start < o+material && o < start+material {
				return corruptf(fmt.Sprintf("luks key slot %d key_offset", i), at+40, "key material overlaps that of key slot %d", j)
			}
		}
	}
	return nil
}

// materialLen is the byte length of one slot's anti-forensic key material.
func (h *luksHeader) materialLen() int64 { return int64(h.KeyBytes) * luksStripes }

// encode writes the header into its 592 bytes.
func (h *luksHeader) encode() []byte {
	buf := make([]byte, luksHeaderLen)
	be := binary.BigEndian
	copy(buf, luksMagic)
	be.PutUint16(buf[luksOffVersion:], h.Version)
	copy(buf[luksOffCipherName:luksOffCipherName+luksNameLen-1], h.CipherName)
	copy(buf[luksOffCipherMode:luksOffCipherMode+luksNameLen-1], h.CipherMode)
	copy(buf[luksOffHashSpec:luksOffHashSpec+luksNameLen-1], h.HashSpec)
	be.PutUint32(buf[luksOffPayload:], h.PayloadOffset)
	be.PutUint32(buf[luksOffKeyBytes:], h.KeyBytes)
	copy(buf[luksOffMKDigest:], h.MKDigest[:])
	copy(buf[luksOffMKDigestSalt:], h.MKDigestSalt[:])
	be.PutUint32(buf[luksOffMKDigestIter:], h.MKDigestIter)
	copy(buf[luksOffUUID:luksOffUUID+luksUUIDLen-1], h.UUID)
	for i := range h.Slots {
		p := buf[luksOffSlots+i*luksSlotLen:]
		s := &h.Slots[i]
		be.PutUint32(p, s.Active)
		be.PutUint32(p[4:], s.Iterations)
		copy(p[8:], s.Salt[:])
		be.PutUint32(p[40:], s.KeyOffset)
		be.PutUint32(p[44:], s.Stripes)
	}
	return buf
}

// luksLayout gives a new header its key slot offsets and payload offset as
// QEMU lays them out: the header padded to 4 KiB, then eight slots of
// key material, each padded to 4 KiB. It returns the region length.
func (h *luksHeader) layout() int64 {
	slotSectors := alignUp(h.materialLen(), luksAlign) / luksSectorSize
	off := int64(alignUp(luksHeaderLen, luksAlign) / luksSectorSize)
	for i := range h.Slots {
		h.Slots[i].KeyOffset = uint32(off)
		h.Slots[i].Stripes = luksStripes
		h.Slots[i].Active = luksSlotDisabled
		off += slotSectors
	}
	h.PayloadOffset = uint32(off)
	return off * luksSectorSize
}
