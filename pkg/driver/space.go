package driver

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// Space in the pool has two budgets. Disk: bytes a create is about to
// allocate (a preallocated image, a copied source, a new image's metadata)
// must be free above the reserve. Provisioning: thin volumes allocate as
// they are written, so their virtual sizes may add up to more than the
// pool, but only up to OvercommitRatio times it; past that the pool would
// fill long before its volumes, and every volume on it would meet ENOSPC.
//
// Both are checked against what is on disk plus what operations in flight
// have claimed: a claim taken under one lock and held until the
// operation's result is on disk, so that concurrent creates can neither
// all pass one free-space check and race for the blocks nor refuse each
// other when one of them fits. A claim counts only its part not yet
// visible on disk (the blocks its file has not allocated yet, the size its
// volume's record does not show yet), so nothing is counted twice.

// spaceClaim is what one create or expansion needs until it is done.
type spaceClaim struct {
	// vol is the volume the operation makes or grows.
	vol string
	// disk is the bytes the operation allocates in the pool; the blocks
	// already allocated by the files in paths count against it.
	disk  int64
	paths []string
	// size is the virtual size vol will have; the part above its recorded
	// capacity counts against the overcommit limit.
	size int64
}

// spaceLedger holds the claims of the operations in flight.
type spaceLedger struct {
	mu     sync.Mutex
	next   uint64
	claims map[uint64]spaceClaim
	// records caches the volumes' recorded capacities by the identity of
	// their record file: every claim adds up the whole pool, and parsing
	// each record each time doubled CreateVolume's time at 500 volumes.
	// A record is replaced by rename (writeFileAtomic), so a changed
	// record has another inode or, should the inode be reused, another
	// mtime.
	records map[string]cachedRecord
}

type cachedRecord struct {
	ino, mtime int64
	capacity   int64
}

// poolSpace is the pool's space at one moment, in bytes.
type poolSpace struct {
	size, free  int64 // the filesystem's size; free to an unprivileged writer
	reserve     int64 // kept free from CreateVolume (--capacity-reserve)
	provisioned int64 // the volumes' recorded virtual sizes (with a limit)
	heldDisk    int64 // claims' disk bytes not yet allocated
	heldSize    int64 // claims' virtual bytes not yet recorded (with a limit)
	limit       int64 // the overcommit limit; 0: none
}

// available is the disk space a new claim may take.
func (s *poolSpace) available() int64 { return max(s.free-s.reserve-s.heldDisk, 0) }

// reserve is the space CreateVolume leaves free: the larger of the two
// reserve options.
func (d *Driver) reserve(total int64) int64 {
	return max(d.opts.CapacityReserve, int64(float64(total)*d.opts.CapacityReservePercent/100))
}

// measureLocked reads the pool's space and, when there is an overcommit
// limit to check, the recorded capacities of its volumes (a scan of the
// pool: without a limit nothing needs them), and adds up the claims in
// flight. The caller holds the ledger.
func (d *Driver) measureLocked() (*poolSpace, map[string]int64, error) {
	total, free, err := d.pool.space()
	if err != nil {
		return nil, nil, err
	}
	s := &poolSpace{size: total, free: free, reserve: d.reserve(total)}
	caps := map[string]int64{}
	if r := d.opts.OvercommitRatio; r > 0 {
		s.limit = int64(min(r*float64(max(total-s.reserve, 0)), 1<<62))
		if caps, err = d.capacitiesLocked(); err != nil {
			return nil, nil, err
		}
	}
	for _, c := range caps {
		s.provisioned += c
	}
	for _, c := range d.ledger.claims {
		done := int64(0)
		for _, p := range c.paths {
			if a, err := allocatedBytes(p); err == nil {
				done += a
			}
		}
		s.heldDisk += max(c.disk-done, 0)
		s.heldSize += max(c.size-caps[d.pool.file(c.vol)], 0)
	}
	return s, caps, nil
}

// capacitiesLocked is the recorded capacity of every volume in the pool,
// by file name (pool.file of its ID), reading only the records that
// changed since the last call. The caller holds the ledger.
func (d *Driver) capacitiesLocked() (map[string]int64, error) {
	ents, err := os.ReadDir(d.pool.dir)
	if err != nil {
		return nil, err
	}
	l := &d.ledger
	seen := make(map[string]cachedRecord, len(ents))
	caps := make(map[string]int64, len(ents))
	for _, e := range ents {
		n := e.Name()
		id := strings.TrimSuffix(n, metaSuffix)
		if !e.Type().IsRegular() || id == n || strings.HasPrefix(n, ".") || checkVolumeID(id) != nil {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue // deleted since listed
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			continue
		}
		key := cachedRecord{ino: int64(st.Ino), mtime: fi.ModTime().UnixNano()}
		if c, ok := l.records[id]; ok && c.ino == key.ino && c.mtime == key.mtime {
			key.capacity = c.capacity
		} else if m, err := d.pool.getFile(id); err == nil {
			key.capacity = m.Capacity
		} else {
			continue // deleted since listed, or unreadable: not provisioned
		}
		seen[id] = key
		caps[id] = key.capacity
	}
	l.records = seen
	return caps, nil
}

// poolSpace measures the pool (metrics, GetCapacity).
func (d *Driver) poolSpace() (*poolSpace, error) {
	d.ledger.mu.Lock()
	defer d.ledger.mu.Unlock()
	s, _, err := d.measureLocked()
	return s, err
}

// claimSpace checks that c fits beside the pool's contents and the claims
// in flight, and holds it until release is called: after the operation's
// result is on disk (its image in place, its record written), or when it
// failed. A refusal is ErrNoSpace naming the numbers.
func (d *Driver) claimSpace(c spaceClaim) (release func(), err error) {
	l := &d.ledger
	l.mu.Lock()
	defer l.mu.Unlock()
	s, caps, err := d.measureLocked()
	if err != nil {
		return nil, err
	}
	if c.disk > 0 && s.available() < c.disk {
		held := ""
		if s.heldDisk > 0 {
			held = fmt.Sprintf(" (%d more are held by creates in flight)", s.heldDisk)
		}
		return nil, fmt.Errorf("%w: %d bytes needed, %d available above the reserve in %s%s", ErrNoSpace, c.disk, s.available(), d.pool.dir, held)
	}
	if grow := c.size - caps[d.pool.file(c.vol)]; s.limit > 0 && grow > 0 && s.provisioned+s.heldSize+grow > s.limit {
		return nil, fmt.Errorf("%w: %d bytes would bring the pool's provisioned total to %d, above the overcommit limit %d (ratio %g × %d bytes of pool after the reserve; %d provisioned, %d being provisioned)",
			ErrNoSpace, grow, s.provisioned+s.heldSize+grow, s.limit, d.opts.OvercommitRatio, s.size-s.reserve, s.provisioned, s.heldSize)
	}
	if l.claims == nil {
		l.claims = map[uint64]spaceClaim{}
	}
	l.next++
	key := l.next
	l.claims[key] = c
	return func() {
		l.mu.Lock()
		delete(l.claims, key)
		l.mu.Unlock()
	}, nil
}

// claimGrowth claims what growing volume m to size bytes needs, for
// ControllerExpandVolume and NodeExpandVolume: growth is thin (a resize
// allocates no data), so provisioning room only, held until the record
// shows the new size. Release is a no-op when the volume does not grow.
func (d *Driver) claimGrowth(m *volumeMeta, size int64) (release func(), err error) {
	if size <= m.Capacity {
		return func() {}, nil
	}
	release, err = d.claimSpace(spaceClaim{vol: m.ID, size: size})
	if err != nil {
		return nil, fmt.Errorf("volume %q: growing to %d bytes: %w", m.ID, size, err)
	}
	return release, nil
}

// createClaim is what CreateVolume claims for a new volume of size bytes
// (sized: the request has a capacity range): a new image's metadata
// headroom, plus its L2 tables when preallocated and all its data when
// fully preallocated. A restore or clone is not preallocated; it copies its
// source's data, so it claims the source image's allocated bytes (a reflink
// shares them and needs less) and the source's size unless the request
// asks for more.
func (d *Driver) createClaim(id string, size int64, sized bool, p volumeParams, src *csi.VolumeContentSource) spaceClaim {
	c := spaceClaim{vol: id, disk: minFreeForThin, paths: []string{d.pool.tempPath(id, imageSuffix), d.pool.imagePath(id)}, size: size}
	if src != nil {
		srcSize, path := d.sourceOf(src)
		if a, err := allocatedBytes(path); err == nil {
			c.disk += a
		}
		if !sized || srcSize > size {
			c.size = srcSize
		}
		return c
	}
	if p.Preallocation != "off" && p.Preallocation != "" {
		c.disk += (size + p.ClusterSize - 1) / p.ClusterSize * 8
	}
	if p.Preallocation == "falloc" || p.Preallocation == "full" {
		c.disk += size
	}
	return c
}

// sourceOf is the size and image path of a content source, or zeros when
// it does not resolve (restoreSource then says why).
func (d *Driver) sourceOf(src *csi.VolumeContentSource) (int64, string) {
	if id := src.GetSnapshot().GetSnapshotId(); id != "" {
		m, err := d.pool.getSnapshot(id)
		if err != nil {
			return 0, ""
		}
		if m.Hidden {
			return m.Size, d.pool.hiddenImagePath(m.Source)
		}
		return m.Size, d.pool.imagePath(m.Source)
	}
	vol := src.GetVolume().GetVolumeId()
	if checkVolumeID(vol) != nil {
		return 0, ""
	}
	m, err := d.pool.get(vol)
	if err != nil {
		return 0, ""
	}
	return m.Capacity, d.pool.imagePath(vol)
}

// capacityFor is GetCapacity's answer for volumes with parameters p: the
// disk space above the reserve for preallocated volumes; for thin ones
// the provisioning room under the overcommit limit (none without a limit:
// then the disk space, as before there was one), as long as the pool can
// hold one more image's metadata.
func (d *Driver) capacityFor(p volumeParams) (int64, error) {
	s, err := d.poolSpace()
	if err != nil {
		return 0, err
	}
	avail := s.available()
	room := max(s.limit-s.provisioned-s.heldSize, 0)
	switch {
	case p.Preallocation == "falloc" || p.Preallocation == "full":
		if s.limit > 0 {
			return min(avail, room), nil
		}
		return avail, nil
	case s.limit == 0:
		return avail, nil
	case avail < minFreeForThin:
		return 0, nil
	}
	return room, nil
}

// spaceLevel is how full the pool is.
type spaceLevel int

const (
	spaceOK   spaceLevel = iota
	spaceLow             // above the warning threshold
	spaceFull            // not even one more image's metadata fits
)

// spaceState says how full the pool is and, when that needs attention,
// what to tell the operator. It reads only statfs, so every volume
// condition and readiness check can afford it.
func (d *Driver) spaceState() (spaceLevel, string) {
	total, free, err := d.pool.space()
	if err != nil {
		return spaceFull, fmt.Sprintf("cannot read the pool's free space: %v", err)
	}
	used := total - free
	switch {
	case free < minFreeForThin:
		return spaceFull, fmt.Sprintf("pool %s is full (%d of %d bytes used, %d free): writes to thin volumes that need new clusters fail with ENOSPC; free space or grow the pool",
			d.pool.dir, used, total, free)
	case float64(used) >= float64(total)*d.opts.PoolWarningPercent/100:
		return spaceLow, fmt.Sprintf("pool %s is %.1f%% full (%d of %d bytes used, %d free), above the warning threshold %g%%: thin volumes get write errors when it fills",
			d.pool.dir, float64(used)*100/float64(total), used, total, free, d.opts.PoolWarningPercent)
	}
	return spaceOK, ""
}

// withSpaceCondition adds the pool's state to a volume's condition: above
// the warning threshold every volume in the pool is at risk (a thin one
// grows into it, a preallocated one still allocates for snapshots' copies
// on write), so the condition turns abnormal before writes fail.
func (d *Driver) withSpaceCondition(c *csi.VolumeCondition) *csi.VolumeCondition {
	if lvl, msg := d.spaceState(); lvl != spaceOK {
		return &csi.VolumeCondition{Abnormal: true, Message: c.GetMessage() + "; " + msg}
	}
	return c
}

// noSpace reports whether err is the pool's filesystem being full.
func noSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}
