package qcow2

import (
	"crypto/aes"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"runtime"
	"sync"
	"time"

	"golang.org/x/crypto/xts"
)

// Key slots: a passphrase unlocks a slot through PBKDF2 (slot salt and
// iteration count), which gives the key that decrypts the slot's key
// material; the material, 4000 stripes run through LUKS's anti-forensic
// merge, is the master key; PBKDF2 of the master key with the digest salt
// must equal the header's master key digest. The master key then
// encrypts the data (aes-xts-plain64, one tweak per 512-byte sector).

// luksHash returns the hash named by a LUKS hash_spec.
func luksHash(spec string) (func() hash.Hash, error) {
	switch spec {
	case "sha1":
		return sha1.New, nil
	case "sha256":
		return sha256.New, nil
	case "sha512":
		return sha512.New, nil
	}
	return nil, fmt.Errorf("hash %q is not supported (sha1, sha256, sha512)", spec)
}

// newXTS returns the aes-xts cipher for a 32- or 64-byte key.
func newXTS(key []byte) (*xts.Cipher, error) {
	return xts.NewCipher(aes.NewCipher, key)
}

// xtsParallelMin is the request size from which xtsSectors spreads the
// work over the CPUs: AES-XTS through x/crypto costs about as much per byte
// as a 1 MiB request's I/O, and its sectors are independent.
const xtsParallelMin = 256 << 10

// xtsSectors encrypts (or decrypts) buf in place, one 512-byte sector at a
// time, the first with tweak sector (plain64: the sector number, little
// endian, zero-padded to the block). len(buf) is a multiple of 512. Large
// buffers are split over GOMAXPROCS goroutines (xts.Cipher is safe for
// concurrent use).
func xtsSectors(c *xts.Cipher, buf []byte, sector uint64, encrypt bool) {
	n := runtime.GOMAXPROCS(0)
	if len(buf) < xtsParallelMin || n < 2 {
		xtsSectorsSerial(c, buf, sector, encrypt)
		return
	}
	per := alignUp(int64(len(buf)/n), luksSectorSize)
	var wg sync.WaitGroup
	for off := int64(0); off < int64(len(buf)); off += per {
		part := buf[off:min(int64(len(buf)), off+per)]
		s := sector + uint64(off/luksSectorSize)
		wg.Go(func() { xtsSectorsSerial(c, part, s, encrypt) })
	}
	wg.Wait()
}

func xtsSectorsSerial(c *xts.Cipher, buf []byte, sector uint64, encrypt bool) {
	for i := 0; i < len(buf); i += luksSectorSize {
		s := buf[i : i+luksSectorSize]
		if encrypt {
			c.Encrypt(s, s, sector)
		} else {
			c.Decrypt(s, s, sector)
		}
		sector++
	}
}

// pbkdf2Key derives n bytes. The passphrase must go through a string
// (crypto/pbkdf2's API): that copy cannot be zeroed.
func pbkdf2Key(h func() hash.Hash, secret, salt []byte, iter, n int) ([]byte, error) {
	k, err := pbkdf2.Key(h, string(secret), salt, iter, n)
	if err != nil {
		return nil, fmt.Errorf("qcow2: luks pbkdf2: %w", err)
	}
	return k, nil
}

// afDiffuse is LUKS's diffusion: the buffer, in hash-sized blocks, each
// replaced by the hash of its big-endian block index and its contents.
func afDiffuse(h func() hash.Hash, buf []byte) {
	hh := h()
	ds := hh.Size()
	var idx [4]byte
	var sum []byte
	for j := 0; j*ds < len(buf); j++ {
		blk := buf[j*ds : min(len(buf), (j+1)*ds)]
		hh.Reset()
		binary.BigEndian.PutUint32(idx[:], uint32(j))
		hh.Write(idx[:])
		hh.Write(blk)
		sum = hh.Sum(sum[:0])
		copy(blk, sum)
	}
}

// afMerge recovers a key of keyLen bytes from its stripes.
func afMerge(h func() hash.Hash, material []byte, keyLen, stripes int) []byte {
	d := make([]byte, keyLen)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, material[i*keyLen:(i+1)*keyLen])
		afDiffuse(h, d)
	}
	subtle.XORBytes(d, d, material[(stripes-1)*keyLen:stripes*keyLen])
	return d
}

// afSplit spreads key over stripes random-looking stripes.
func afSplit(h func() hash.Hash, key []byte, stripes int) ([]byte, error) {
	n := len(key)
	out := make([]byte, n*stripes)
	if _, err := rand.Read(out[:n*(stripes-1)]); err != nil {
		return nil, err
	}
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, out[i*n:(i+1)*n])
		afDiffuse(h, d)
	}
	subtle.XORBytes(out[(stripes-1)*n:], d, key)
	clear(d)
	return out, nil
}

// ErrWrongPassphrase means no active key slot of an encrypted image opens
// with the passphrase given.
var ErrWrongPassphrase = errors.New("qcow2: invalid password, cannot unlock any keyslot")

// ErrKeyRequired means an encrypted image was opened without a passphrase
// and guest data was asked for.
var ErrKeyRequired = errors.New("qcow2: image is encrypted: a passphrase is required for guest data")

// DefaultMaxPBKDF2Iterations bounds the PBKDF2 work one open may do (see
// OpenOptions.MaxPBKDF2Iterations): about 14 s of one core on the 2026
// reference machine (2.4 million iterations per second with sha256). An
// image QEMU makes with its default iter-time (2 s) needs 4 to 10 million
// for its slot on today's machines, and a rotation keeps two slots.
const DefaultMaxPBKDF2Iterations = 1 << 25

// luksUnlock finds the master key for passphrase: each enabled slot in
// turn, within a budget of PBKDF2 iterations. readMaterial reads a slot's
// encrypted key material. It returns the master key and the slot.
func luksUnlock(h *luksHeader, passphrase []byte, budget int64, readMaterial func(slot int) ([]byte, error)) ([]byte, int, error) {
	hf, err := luksHash(h.HashSpec)
	if err != nil {
		return nil, -1, err
	}
	spent := int64(0)
	tried := 0
	for i := range h.Slots {
		s := &h.Slots[i]
		if !s.enabled() {
			continue
		}
		tried++
		cost := int64(s.Iterations) + int64(h.MKDigestIter)
		if spent+cost > budget {
			return nil, -1, fmt.Errorf("%w: luks key slot %d: %d iterations (plus %d for the master key digest) exceed what is left of the open's PBKDF2 budget (%d of %d); raise OpenOptions.MaxPBKDF2Iterations if the image is trusted",
				ErrUnsupported, i, s.Iterations, h.MKDigestIter, budget-spent, budget)
		}
		spent += cost
		mk, err := luksTrySlot(h, hf, i, passphrase, readMaterial)
		if err != nil {
			return nil, -1, err
		}
		if mk != nil {
			return mk, i, nil
		}
	}
	if tried == 0 {
		return nil, -1, fmt.Errorf("%w: no key slot is active", ErrWrongPassphrase)
	}
	return nil, -1, ErrWrongPassphrase
}

// luksTrySlot returns the master key if passphrase opens slot i, nil if
// it does not.
func luksTrySlot(h *luksHeader, hf func() hash.Hash, i int, passphrase []byte, readMaterial func(int) ([]byte, error)) ([]byte, error) {
	s := &h.Slots[i]
	kb := int(h.KeyBytes)
	slotKey, err := pbkdf2Key(hf, passphrase, s.Salt[:], int(s.Iterations), kb)
	if err != nil {
		return nil, err
	}
	defer clear(slotKey)
	material, err := readMaterial(i)
	if err != nil {
		return nil, err
	}
	defer clear(material)
	c, err := newXTS(slotKey)
	if err != nil {
		return nil, err
	}
	xtsSectors(c, material, 0, false)
	mk := afMerge(hf, material, kb, int(s.Stripes))
	ok, err := luksCheckMasterKey(h, hf, mk)
	if err != nil || !ok {
		clear(mk)
		return nil, err
	}
	return mk, nil
}

// luksVerifyMasterKey returns a copy of mk if it is the header's master
// key (its PBKDF2 digest matches), within the open's iteration budget.
func luksVerifyMasterKey(h *luksHeader, mk []byte, budget int64) ([]byte, error) {
	if len(mk) != int(h.KeyBytes) {
		return nil, fmt.Errorf("%w: the master key is %d bytes, the image's is %d", ErrWrongPassphrase, len(mk), h.KeyBytes)
	}
	if int64(h.MKDigestIter) > budget {
		return nil, fmt.Errorf("%w: luks master key digest: %d iterations exceed the open's PBKDF2 budget (%d); raise OpenOptions.MaxPBKDF2Iterations if the image is trusted",
			ErrUnsupported, h.MKDigestIter, budget)
	}
	hf, err := luksHash(h.HashSpec)
	if err != nil {
		return nil, err
	}
	ok, err := luksCheckMasterKey(h, hf, mk)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: the master key does not match the image's master key digest", ErrWrongPassphrase)
	}
	return append([]byte(nil), mk...), nil
}

func luksCheckMasterKey(h *luksHeader, hf func() hash.Hash, mk []byte) (bool, error) {
	d, err := pbkdf2Key(hf, mk, h.MKDigestSalt[:], int(h.MKDigestIter), luksDigestLen)
	if err != nil {
		return false, err
	}
	return subtle.ConstantTimeCompare(d, h.MKDigest[:]) == 1, nil
}

// luksFillSlot makes slot i open with passphrase: new salt, iterations for
// iterTime, and the master key split and encrypted. It returns the
// encrypted key material to write at the slot's key offset; the caller
// marks the slot enabled once the material is durable.
func luksFillSlot(h *luksHeader, i int, mk, passphrase []byte, iterTime time.Duration) ([]byte, error) {
	hf, err := luksHash(h.HashSpec)
	if err != nil {
		return nil, err
	}
	s := &h.Slots[i]
	if _, err := rand.Read(s.Salt[:]); err != nil {
		return nil, err
	}
	iters, err := pbkdf2Iterations(hf, int(h.KeyBytes), iterTime)
	if err != nil {
		return nil, err
	}
	s.Iterations = uint32(max(iters, luksMinIters))
	slotKey, err := pbkdf2Key(hf, passphrase, s.Salt[:], int(s.Iterations), int(h.KeyBytes))
	if err != nil {
		return nil, err
	}
	defer clear(slotKey)
	material, err := afSplit(hf, mk, luksStripes)
	if err != nil {
		return nil, err
	}
	c, err := newXTS(slotKey)
	if err != nil {
		return nil, err
	}
	padded := make([]byte, alignUp(int64(len(material)), luksSectorSize))
	copy(padded, material)
	clear(material)
	xtsSectors(c, padded, 0, true)
	return padded, nil
}

// pbkdf2Iterations estimates, as QEMU's qcrypto_pbkdf2_count_iters does,
// how many iterations take iterTime on this machine, timing rounds of
// growing size until one lasts long enough to trust.
func pbkdf2Iterations(hf func() hash.Hash, keyLen int, iterTime time.Duration) (int, error) {
	salt := make([]byte, luksSaltLen)
	pw := []byte("qcow2-csi iteration probe")
	n := 1 << 10
	for {
		t := time.Now()
		if _, err := pbkdf2Key(hf, pw, salt, n, keyLen); err != nil {
			return 0, err
		}
		el := time.Since(t)
		if el >= 50*time.Millisecond || el >= iterTime || n >= 1<<30 {
			perSec := float64(n) / max(el.Seconds(), 1e-6)
			it := perSec * iterTime.Seconds()
			if it > float64(^uint32(0)) {
				return 0, fmt.Errorf("%w: iter-time %v needs more than 2^32 PBKDF2 iterations", ErrInvalidOption, iterTime)
			}
			return int(it), nil
		}
		n *= 2
	}
}

// newLUKSHeader makes a header with a fresh master key (returned) and
// slot 0 opening with passphrase; material is slot 0's key material.
func newLUKSHeader(o *EncryptionOptions) (h *luksHeader, mk, material []byte, regionLen int64, err error) {
	h = &luksHeader{Version: 1, CipherName: "aes", CipherMode: "xts-plain64", HashSpec: o.HashAlg, KeyBytes: uint32(o.keyBytes())}
	regionLen = h.layout()
	hf, err := luksHash(h.HashSpec)
	if err != nil {
		return nil, nil, nil, 0, fmt.Errorf("%w: %v", ErrInvalidOption, err)
	}
	mk = make([]byte, h.KeyBytes)
	var uuid [16]byte
	for _, b := range [][]byte{mk, h.MKDigestSalt[:], uuid[:]} {
		if _, err := rand.Read(b); err != nil {
			return nil, nil, nil, 0, err
		}
	}
	uuid[6] = uuid[6]&0x0f | 0x40 // version 4
	uuid[8] = uuid[8]&0x3f | 0x80 // RFC 4122 variant
	h.UUID = fmt.Sprintf("%x-%x-%x-%x-%x", uuid[0:4], uuid[4:6], uuid[6:8], uuid[8:10], uuid[10:16])
	// QEMU spends an eighth of iter-time on the digest (as cryptsetup).
	iters, err := pbkdf2Iterations(hf, int(h.KeyBytes), o.IterTime/8)
	if err != nil {
		return nil, nil, nil, 0, err
	}
	h.MKDigestIter = uint32(max(iters, luksMinIters))
	d, err := pbkdf2Key(hf, mk, h.MKDigestSalt[:], int(h.MKDigestIter), luksDigestLen)
	if err != nil {
		return nil, nil, nil, 0, err
	}
	copy(h.MKDigest[:], d)
	material, err = luksFillSlot(h, 0, mk, o.Passphrase, o.IterTime)
	if err != nil {
		clear(mk)
		return nil, nil, nil, 0, err
	}
	h.Slots[0].Active = luksSlotEnabled
	return h, mk, material, regionLen, nil
}
