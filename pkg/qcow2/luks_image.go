package qcow2

import (
	"crypto/rand"
	"fmt"
	"runtime"
	"sync"
	"time"

	"golang.org/x/crypto/xts"
)

// Encrypted images (crypt_method 2, encrypt.format=luks).
//
// The LUKS header and key material live in host clusters named by the
// full disk encryption header extension, counted by refcounts like any
// metadata. Guest data clusters are encrypted where they lie: every
// 512-byte sector with aes-xts and the plain64 tweak of its *host* offset
// divided by 512, as QEMU does for LUKS in qcow2 (crypt_physical_offset:
// the guest offset would let equal tweaks recur across snapshots).
// Metadata (tables, refcounts, snapshots, bitmaps) stays clear, so
// snapshots, bitmaps, resize and check never need the key; only guest
// data does. Copy-on-write re-encrypts for the new host cluster; a file
// copied whole (reflink, sparse copy) keeps its offsets and stays valid.
// Compressed clusters are never written to an encrypted image.

// EncryptionOptions make a new image encrypted (CreateOptions.Encryption),
// with the defaults of qemu-img create -o encrypt.format=luks.
type EncryptionOptions struct {
	// Format is "luks", the only format supported (and the default).
	Format string
	// Passphrase opens key slot 0. Required; not retained.
	Passphrase []byte
	// CipherAlg is "aes-256" (default, qemu's) or "aes-128"; the mode is
	// always xts with the plain64 IV generator.
	CipherAlg string
	// HashAlg is the PBKDF2 and anti-forensic hash: "sha256" (default),
	// "sha1" or "sha512".
	HashAlg string
	// IterTime is how long unlocking the key slot should take on this
	// machine (qemu's encrypt.iter-time); default 2 s, as qemu. The master
	// key digest gets an eighth of it. At least 1000 iterations each.
	IterTime time.Duration
}

func (o *EncryptionOptions) normalize() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidOption, fmt.Sprintf(format, args...))
	}
	if o.Format == "" {
		o.Format = "luks"
	}
	if o.CipherAlg == "" {
		o.CipherAlg = "aes-256"
	}
	if o.HashAlg == "" {
		o.HashAlg = "sha256"
	}
	if o.IterTime == 0 {
		o.IterTime = 2 * time.Second
	}
	switch {
	case o.Format != "luks":
		return bad("encryption format %q is not supported (luks)", o.Format)
	case len(o.Passphrase) == 0:
		return bad("encryption needs a passphrase (encrypt.key-secret)")
	case o.CipherAlg != "aes-256" && o.CipherAlg != "aes-128":
		return bad("cipher %q is not supported (aes-256, aes-128)", o.CipherAlg)
	case o.IterTime < 0:
		return bad("negative iter-time %v", o.IterTime)
	}
	if _, err := luksHash(o.HashAlg); err != nil {
		return bad("%v", err)
	}
	return nil
}

// keyBytes is the xts master key length: two AES keys.
func (o *EncryptionOptions) keyBytes() int {
	if o.CipherAlg == "aes-128" {
		return 32
	}
	return 64
}

// imageCrypto is an open image's encryption state.
type imageCrypto struct {
	hdr      *luksHeader
	off, len int64  // the LUKS header region in the file
	key      []byte // master key; nil when opened without a passphrase
	c        *xts.Cipher
	slot     int // the key slot the passphrase opened
}

// loadCrypto reads the LUKS header and, given a passphrase, finds the
// master key. Nothing is written.
func (img *Image) loadCrypto(opts OpenOptions) error {
	ext := img.hdr.Crypto
	if ext == nil {
		return nil
	}
	cr := &imageCrypto{off: int64(ext.Offset), len: int64(ext.Length), slot: -1}
	buf := make([]byte, luksHeaderLen)
	if _, err := img.f.ReadAt(buf, cr.off); err != nil {
		return ioErr("read LUKS header", err)
	}
	h, err := decodeLUKSHeader(buf, cr.off, cr.len)
	if err != nil {
		return err
	}
	cr.hdr = h
	img.crypto = cr
	budget := opts.MaxPBKDF2Iterations
	if budget <= 0 {
		budget = DefaultMaxPBKDF2Iterations
	}
	switch {
	case opts.MasterKey != nil && opts.Passphrase != nil:
		return fmt.Errorf("%w: a passphrase and a master key were both given", ErrInvalidOption)
	case opts.MasterKey != nil:
		key, err := luksVerifyMasterKey(h, opts.MasterKey, budget)
		if err != nil {
			return fmt.Errorf("%w (image %s)", err, img.path)
		}
		return cr.setKey(key, -1)
	case opts.Passphrase == nil:
		return nil
	}
	key, slot, err := luksUnlock(h, opts.Passphrase, budget, img.readKeyMaterial)
	if err != nil {
		return fmt.Errorf("%w (image %s)", err, img.path)
	}
	return cr.setKey(key, slot)
}

// MasterKey returns a copy of an encrypted image's master key, for a
// caller that must open the image again without its passphrase
// (OpenOptions.MasterKey). The caller zeroes it. ErrKeyRequired when the
// image was opened without its key, ErrInvalidOption on a plain image.
func (img *Image) MasterKey() ([]byte, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	switch {
	case img.closed:
		return nil, ErrClosed
	case img.crypto == nil:
		return nil, fmt.Errorf("%w: image is not encrypted", ErrInvalidOption)
	case img.crypto.key == nil:
		return nil, ErrKeyRequired
	}
	return append([]byte(nil), img.crypto.key...), nil
}

func (cr *imageCrypto) setKey(key []byte, slot int) error {
	c, err := newXTS(key)
	if err != nil {
		clear(key)
		return err
	}
	cr.key, cr.c, cr.slot = key, c, slot
	return nil
}

// readKeyMaterial reads key slot i's encrypted key material (key offsets
// never change: no lock needed).
func (img *Image) readKeyMaterial(i int) ([]byte, error) {
	h := img.crypto.hdr
	buf := make([]byte, alignUp(h.materialLen(), luksSectorSize))
	if _, err := img.f.ReadAt(buf, img.crypto.off+int64(h.Slots[i].KeyOffset)*luksSectorSize); err != nil {
		return nil, ioErr(fmt.Sprintf("read LUKS key slot %d", i), err)
	}
	return buf, nil
}

// wipeKey forgets the master key. The AES key schedules inside the xts
// cipher belong to crypto/aes and cannot be cleared from Go; dropping the
// cipher leaves them to the garbage collector.
func (cr *imageCrypto) wipeKey() {
	if cr == nil {
		return
	}
	clear(cr.key)
	cr.key, cr.c = nil, nil
}

// dataCipher returns the cipher for guest data, or an error when the image
// is encrypted but was opened without its passphrase. nil, nil for a
// plain image.
func (img *Image) dataCipher() (*xts.Cipher, error) {
	if img.crypto == nil {
		return nil, nil
	}
	if img.crypto.c == nil {
		return nil, ErrKeyRequired
	}
	return img.crypto.c, nil
}

// readGuestData reads guest data stored at host offset host, decrypting
// it on an encrypted image (whole sectors are read and decrypted; the
// caller's range need not be sector aligned).
func (img *Image) readGuestData(dst []byte, host int64) error {
	if img.crypto == nil {
		return img.preadData(dst, host)
	}
	c, err := img.dataCipher()
	if err != nil {
		return err
	}
	start, end := alignDown(host, luksSectorSize), alignUp(host+int64(len(dst)), luksSectorSize)
	buf := dst
	if start != host || end != host+int64(len(dst)) {
		buf = make([]byte, end-start)
	}
	if err := img.preadData(buf, start); err != nil {
		return err
	}
	xtsSectors(c, buf, uint64(start/luksSectorSize), false)
	if &buf[0] != &dst[0] {
		copy(dst, buf[host-start:])
	}
	return nil
}

// Encrypted reports whether the image's data is encrypted.
func (img *Image) Encrypted() bool { return img.crypto != nil }

// EncryptionInfo is what qemu-img info reports under format-specific
// "encrypt" for a LUKS image.
// Fields are in qemu-img's JSON order.
type EncryptionInfo struct {
	IvgenAlg        string        `json:"ivgen-alg"`
	HashAlg         string        `json:"hash-alg"`
	CipherAlg       string        `json:"cipher-alg"`
	UUID            string        `json:"uuid"`
	Format          string        `json:"format"`
	CipherMode      string        `json:"cipher-mode"`
	Slots           []KeySlotInfo `json:"slots"`
	PayloadOffset   int64         `json:"payload-offset"`
	MasterKeyIters  int64         `json:"master-key-iters"`
	UnlockedKeySlot int           `json:"-"` // -1 when opened without a passphrase (or with the master key)
}

// KeySlotInfo describes one key slot (qemu's QCryptoBlockInfoLUKSSlot).
type KeySlotInfo struct {
	Active    bool   `json:"active"`
	Iters     *int64 `json:"iters,omitempty"`
	KeyOffset int64  `json:"key-offset"`
	Stripes   *int64 `json:"stripes,omitempty"`
}

// Encryption describes the image's encryption, nil for a plain image.
func (img *Image) Encryption() *EncryptionInfo {
	img.mu.Lock()
	defer img.mu.Unlock()
	cr := img.crypto
	if cr == nil {
		return nil
	}
	h := cr.hdr
	mode, ivgen, _ := splitMode(h.CipherMode)
	info := &EncryptionInfo{
		Format:          "luks",
		CipherAlg:       fmt.Sprintf("%s-%d", h.CipherName, h.KeyBytes*8/2),
		CipherMode:      mode,
		IvgenAlg:        ivgen,
		HashAlg:         h.HashSpec,
		PayloadOffset:   int64(h.PayloadOffset) * luksSectorSize,
		MasterKeyIters:  int64(h.MKDigestIter),
		UUID:            h.UUID,
		UnlockedKeySlot: cr.slot,
	}
	for _, s := range h.Slots {
		ks := KeySlotInfo{Active: s.enabled(), KeyOffset: int64(s.KeyOffset) * luksSectorSize}
		if s.enabled() {
			it, st := int64(s.Iterations), int64(s.Stripes)
			ks.Iters, ks.Stripes = &it, &st
		}
		info.Slots = append(info.Slots, ks)
	}
	return info
}

func splitMode(m string) (mode, ivgen string, ok bool) {
	for i := range len(m) {
		if m[i] == '-' {
			return m[:i], m[i+1:], true
		}
	}
	return m, "", false
}

// setupEncryption turns a new, empty image into an encrypted one: LUKS
// header region allocated and written (durable) before the header points
// to it. A new header comes from o, or src's is copied whole (key slots
// included) with its master key. drain held exclusively, mu held.
func (img *Image) setupEncryption(o *EncryptionOptions, src *Image) error {
	if img.hdr.Version < 3 {
		return fmt.Errorf("%w: LUKS encryption needs compat=1.1", ErrInvalidOption)
	}
	var (
		lh        *luksHeader
		key       []byte
		regionLen int64
		region    []byte // the whole region as it is to be written
		err       error
	)
	if src != nil {
		lh, key, region, err = src.cryptoCopy()
		regionLen = int64(len(region))
	} else {
		var material []byte
		lh, key, material, regionLen, err = newLUKSHeader(o)
		if err == nil {
			region = make([]byte, regionLen)
			copy(region, lh.encode())
			copy(region[int64(lh.Slots[0].KeyOffset)*luksSectorSize:], material)
		}
	}
	if err != nil {
		return err
	}
	n := alignUp(regionLen, img.clusterSize) >> img.clusterBits
	off, err := img.allocClusters(n)
	if err != nil {
		clear(key)
		return err
	}
	for c := off >> img.clusterBits; c < off>>img.clusterBits+n; c++ {
		img.metaMap[c] = metaCryptoHeader
	}
	cr := &imageCrypto{hdr: lh, off: off, len: regionLen}
	region = append(region, make([]byte, n<<img.clusterBits-regionLen)...)
	if err := img.writeMeta(region, off, metaCryptoHeader, "LUKS header"); err != nil {
		clear(key)
		return err
	}
	if err := img.syncRefcounts(false); err != nil {
		clear(key)
		return err
	}
	if err := img.fsync(); err != nil {
		clear(key)
		return err
	}
	img.hdr.CryptMethod = cryptLUKS
	img.hdr.Crypto = &cryptoExt{Offset: uint64(off), Length: uint64(regionLen)}
	if err := img.writeHeader(); err != nil {
		clear(key)
		return err
	}
	if err := cr.setKey(key, 0); err != nil {
		return err
	}
	img.crypto = cr
	return img.fsync()
}

// KeySlotOptions control AddKeySlot.
type KeySlotOptions struct {
	// Slot is the key slot to fill, or -1 for the first free one.
	Slot int
	// IterTime as in EncryptionOptions (default 2 s).
	IterTime time.Duration
}

// AddKeySlot makes passphrase open the image too, in a new key slot (qemu-img
// amend -o encrypt.state=active,encrypt.new-secret=...). The image must be
// open with a passphrase. Data is not rewritten: the slot holds the same
// master key. It returns the slot used.
func (img *Image) AddKeySlot(passphrase []byte, o KeySlotOptions) (int, error) {
	if len(passphrase) == 0 {
		return -1, fmt.Errorf("%w: empty passphrase", ErrInvalidOption)
	}
	if o.IterTime == 0 {
		o.IterTime = 2 * time.Second
	}
	// Choose the slot and derive its material without holding the image:
	// PBKDF2 takes seconds and the data path needs none of this.
	img.mu.Lock()
	cr, err := img.keyslotTarget()
	var h luksHeader
	slot := o.Slot
	if err == nil {
		h = *cr.hdr
		slot, err = pickSlot(&h, o.Slot)
	}
	img.mu.Unlock()
	if err != nil {
		return -1, err
	}
	material, err := luksFillSlot(&h, slot, cr.key, passphrase, o.IterTime)
	if err != nil {
		return -1, err
	}
	unlock, err := img.lockShared()
	if err != nil {
		return -1, err
	}
	defer unlock()
	if img.readOnly {
		return -1, ErrReadOnly
	}
	if cr.hdr.Slots[slot].enabled() {
		return -1, fmt.Errorf("%w: key slot %d was filled meanwhile", ErrInvalidOption, slot)
	}
	// Material first, durable, then the header that enables the slot: a
	// crash in between leaves the slot disabled.
	if err := img.writeMeta(material, cr.off+int64(h.Slots[slot].KeyOffset)*luksSectorSize, metaCryptoHeader, "LUKS key material"); err != nil {
		return -1, err
	}
	if err := img.fsync(); err != nil {
		return -1, err
	}
	nh := *cr.hdr
	nh.Slots[slot] = h.Slots[slot]
	nh.Slots[slot].Active = luksSlotEnabled
	if err := img.writeLUKSHeader(&nh); err != nil {
		return -1, err
	}
	return slot, nil
}

// keyslotTarget returns the crypto state of an image whose key slots may
// change. mu held.
func (img *Image) keyslotTarget() (*imageCrypto, error) {
	switch {
	case img.closed:
		return nil, ErrClosed
	case img.crypto == nil:
		return nil, fmt.Errorf("%w: image is not encrypted", ErrInvalidOption)
	case img.readOnly:
		return nil, ErrReadOnly
	case img.crypto.key == nil:
		return nil, ErrKeyRequired
	}
	return img.crypto, nil
}

func pickSlot(h *luksHeader, want int) (int, error) {
	if want >= 0 {
		if want >= luksSlots {
			return -1, fmt.Errorf("%w: key slot %d is out of range 0..%d", ErrInvalidOption, want, luksSlots-1)
		}
		if h.Slots[want].enabled() {
			return -1, fmt.Errorf("%w: refusing to overwrite active key slot %d", ErrInvalidOption, want)
		}
		return want, nil
	}
	for i := range h.Slots {
		if !h.Slots[i].enabled() {
			return i, nil
		}
	}
	return -1, fmt.Errorf("%w: all %d key slots are active", ErrInvalidOption, luksSlots)
}

// RemoveKeySlots disables every key slot that passphrase opens (qemu-img
// amend -o encrypt.state=inactive,encrypt.old-secret=...), or only slot
// when it is not -1 (encrypt.keyslot=N, passphrase then unused). The last
// active slot is never removed: the data would be lost. The removed slots'
// key material is overwritten. It returns the slots removed.
func (img *Image) RemoveKeySlots(passphrase []byte, slot int) ([]int, error) {
	img.mu.Lock()
	cr, err := img.keyslotTarget()
	var h luksHeader
	if err == nil {
		h = *cr.hdr
	}
	img.mu.Unlock()
	if err != nil {
		return nil, err
	}
	var remove []int
	switch {
	case slot >= luksSlots || slot < -1:
		return nil, fmt.Errorf("%w: key slot %d is out of range 0..%d", ErrInvalidOption, slot, luksSlots-1)
	case slot >= 0:
		if !h.Slots[slot].enabled() {
			return nil, fmt.Errorf("%w: key slot %d is not active", ErrInvalidOption, slot)
		}
		remove = []int{slot}
	default:
		hf, err := luksHash(h.HashSpec)
		if err != nil {
			return nil, err
		}
		for i := range h.Slots {
			if !h.Slots[i].enabled() {
				continue
			}
			mk, err := luksTrySlot(&h, hf, i, passphrase, img.readKeyMaterial)
			if err != nil {
				return nil, err
			}
			if mk != nil {
				clear(mk)
				remove = append(remove, i)
			}
		}
		if len(remove) == 0 {
			return nil, fmt.Errorf("%w: no key slot matches the old secret", ErrInvalidOption)
		}
	}
	unlock, err := img.lockShared()
	if err != nil {
		return nil, err
	}
	defer unlock()
	nh := *cr.hdr
	active := 0
	for i := range nh.Slots {
		if nh.Slots[i].enabled() {
			active++
		}
	}
	if active <= len(remove) {
		return nil, fmt.Errorf("%w: refusing to remove the last active key slot(s) %v: the data could never be read again", ErrInvalidOption, remove)
	}
	for _, i := range remove {
		nh.Slots[i].Active = luksSlotDisabled
		nh.Slots[i].Iterations = 0
		clear(nh.Slots[i].Salt[:])
	}
	if err := img.writeLUKSHeader(&nh); err != nil {
		return nil, err
	}
	// Header durable first: only then is the material unused.
	junk := make([]byte, alignUp(nh.materialLen(), luksSectorSize))
	for _, i := range remove {
		if _, err := rand.Read(junk); err != nil {
			return nil, err
		}
		if err := img.writeMeta(junk, cr.off+int64(nh.Slots[i].KeyOffset)*luksSectorSize, metaCryptoHeader, "LUKS key material"); err != nil {
			return nil, err
		}
	}
	return remove, img.fsync()
}

// writeLUKSHeader writes h as the image's LUKS header, durably, and makes
// it current. mu held.
func (img *Image) writeLUKSHeader(h *luksHeader) error {
	if err := img.writeMeta(h.encode(), img.crypto.off, metaCryptoHeader, "LUKS header"); err != nil {
		return err
	}
	if err := img.fsync(); err != nil {
		return err
	}
	img.crypto.hdr = h
	return nil
}

// encryptPlans encrypts each plan's prepared cluster bytes in place for
// the host offset they go to; a batch of many clusters is spread over the
// CPUs (one cluster is below xtsSectors' own threshold).
func (img *Image) encryptPlans(c *xts.Cipher, plans []plan) {
	enc := func(pl *plan) {
		xtsSectors(c, pl.buf, uint64((pl.host+pl.fillStart)/luksSectorSize), true)
	}
	total := 0
	for i := range plans {
		total += len(plans[i].buf)
	}
	workers := runtime.GOMAXPROCS(0)
	if total < xtsParallelMin || workers < 2 || len(plans) < 2 {
		for i := range plans {
			enc(&plans[i])
		}
		return
	}
	var wg sync.WaitGroup
	next := make(chan *plan)
	for range min(workers, len(plans)) {
		wg.Go(func() {
			for pl := range next {
				enc(pl)
			}
		})
	}
	for i := range plans {
		next <- &plans[i]
	}
	close(next)
	wg.Wait()
}

// cryptoCopy returns what another image needs to be encrypted like this
// one: the decoded header, a copy of the master key and the whole LUKS
// region (header and key material of every slot) as read from the file.
func (img *Image) cryptoCopy() (*luksHeader, []byte, []byte, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	cr := img.crypto
	if cr == nil || cr.key == nil {
		return nil, nil, nil, ErrKeyRequired
	}
	region := make([]byte, cr.len)
	if _, err := img.f.ReadAt(region, cr.off); err != nil {
		return nil, nil, nil, ioErr("read LUKS header region", err)
	}
	h := *cr.hdr
	return &h, append([]byte(nil), cr.key...), region, nil
}
