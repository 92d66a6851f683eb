package driver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Bases of overlay clones (cloneMode=overlay, docs/snapshots.md).
//
// A base is an immutable qcow2 image, <pool>/.bases/<name>.qcow2, holding
// a snapshot (or a volume's disk at clone time) frozen once. An overlay
// volume's image names it as its backing file, relative to the pool
// (".bases/<name>.qcow2"); a hidden image in .snapshots reaches it through
// the link .snapshots/.bases -> ../.bases, so the name stays valid when a
// deleted volume's image moves there.
//
// Each user of a base has a reference file in <pool>/.bases/<name>.refs/:
// "v-<volume file>" for a volume image (live, or hidden for its snapshots),
// "b-<base>" for a base made from an overlay's snapshot by reflink, which
// is an overlay of this one. The reference is written and made durable
// before the user's image exists, and removed after the image is gone, so
// at every instant the references cover every image that reads the base.
// The last reference's removal removes the base (and its own reference in
// the base below, and so on down the chain).
//
// A crash can leave references whose user never came to be or is gone:
// recoverBases, run at start after the pool's own recovery has removed
// images without a record, drops every reference whose image does not
// name the base, then every base left without references. A killed clone
// thus leaves either a working volume (its record written) or nothing.
const (
	basesDir      = ".bases"
	baseRefSuffix = ".refs"
	refVolume     = "v-"
	refBase       = "b-"
	// snapBasePrefix and volBasePrefix start the names of bases frozen
	// from a snapshot and from a volume's current disk.
	snapBasePrefix = "s-"
	volBasePrefix  = "c-"
)

func (p *pool) baseDir() string             { return filepath.Join(p.dir, basesDir) }
func (p *pool) basePath(name string) string { return filepath.Join(p.baseDir(), name+imageSuffix) }
func (p *pool) baseRefs(name string) string { return filepath.Join(p.baseDir(), name+baseRefSuffix) }
func (p *pool) baseTemp(name string) string {
	return filepath.Join(p.baseDir(), tmpPrefix+name+imageSuffix)
}
func (p *pool) volRef(vol string) string { return refVolume + p.file(vol) }

// baseOfBacking is the base an image's backing file name points to, "" when
// it names no base of this pool's.
func baseOfBacking(backing string) string {
	dir, file := filepath.Split(backing)
	if filepath.Clean(dir) != basesDir || !strings.HasSuffix(file, imageSuffix) || strings.HasPrefix(file, ".") {
		return ""
	}
	return strings.TrimSuffix(file, imageSuffix)
}

// backingOf reads the backing file name in an image's header without
// taking its locks or opening its chain (the image may be open by the node).
func backingOf(path string) (string, error) {
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoLock: true, NoBacking: true})
	if err != nil {
		return "", err
	}
	defer img.Close()
	info, err := img.Info()
	if err != nil {
		return "", err
	}
	return info.BackingFile, nil
}

// baseOf is the base the image at path reads from ("" when none, or when
// there is no image).
func baseOf(path string) string {
	b, err := backingOf(path)
	if err != nil {
		return ""
	}
	return baseOfBacking(b)
}

// baseLocks serialises the making, referencing and release of one base.
// These are short (a base being frozen by copy is the long one, and a
// second clone of the same snapshot has to wait for it anyway).
type baseLocks struct {
	mu sync.Mutex
	m  map[string]*baseLock
}

type baseLock struct {
	sync.Mutex
	n int
}

func (l *baseLocks) lock(name string) (unlock func()) {
	l.mu.Lock()
	if l.m == nil {
		l.m = map[string]*baseLock{}
	}
	b := l.m[name]
	if b == nil {
		b = &baseLock{}
		l.m[name] = b
	}
	b.n++
	l.mu.Unlock()
	b.Lock()
	return func() {
		b.Unlock()
		l.mu.Lock()
		if b.n--; b.n == 0 {
			delete(l.m, name)
		}
		l.mu.Unlock()
	}
}

// addRef records user as a reader of base name, durably, before the user's
// image is made.
func (p *pool) addRef(name, user string) error {
	dir := p.baseRefs(name)
	if err := os.MkdirAll(dir, poolDirMode); err != nil {
		return err
	}
	if err := syncDir(p.baseDir()); err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, user), []byte(user+"\n"))
}

// dropRef removes user's reference to base name, and the base when it was
// the last one; a base's removal drops its own reference in the base it
// reads from, down the chain. It returns the bases removed. The caller holds
// no base lock; dropRef takes them one at a time.
func (p *pool) dropRef(locks *baseLocks, name, user string) ([]string, error) {
	var removed []string
	for name != "" {
		unlock := locks.lock(name)
		next, gone, err := p.dropRefLocked(name, user)
		unlock()
		if err != nil {
			return removed, err
		}
		if !gone {
			break
		}
		removed = append(removed, name)
		name, user = next, refBase+name
	}
	return removed, nil
}

// dropRefLocked is one step of dropRef: it returns whether the base went,
// and then the base it read from.
func (p *pool) dropRefLocked(name, user string) (next string, gone bool, err error) {
	if err := removeDurably(filepath.Join(p.baseRefs(name), user)); err != nil {
		return "", false, err
	}
	left, err := p.refsOf(name)
	if err != nil || len(left) > 0 {
		return "", false, err
	}
	next = baseOf(p.basePath(name))
	if err := removeDurably(p.basePath(name)); err != nil {
		return "", false, err
	}
	if err := os.Remove(p.baseRefs(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", false, err
	}
	return next, true, syncDir(p.baseDir())
}

// refsOf lists the references to base name.
func (p *pool) refsOf(name string) ([]string, error) {
	ents, err := readDirOrNone(p.baseRefs(name))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".") {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// readDirOrNone is os.ReadDir with a missing directory read as empty.
func readDirOrNone(dir string) ([]fs.DirEntry, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return ents, err
}

// listBases returns the names of the bases in the pool, sorted.
func (p *pool) listBases() ([]string, error) {
	ents, err := readDirOrNone(p.baseDir())
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		n := e.Name()
		if e.Type().IsRegular() && strings.HasSuffix(n, imageSuffix) && !strings.HasPrefix(n, ".") {
			out = append(out, strings.TrimSuffix(n, imageSuffix))
		}
	}
	sort.Strings(out)
	return out, nil
}

// linkSnapshotBases makes .snapshots/.bases point to ../.bases, so that a
// hidden image's backing file name (relative to its directory) still
// finds its base.
func (p *pool) linkSnapshotBases() error {
	if err := os.MkdirAll(p.snapDir(), 0o750); err != nil {
		return err
	}
	link := filepath.Join(p.snapDir(), basesDir)
	if t, err := os.Readlink(link); err == nil && t == filepath.Join("..", basesDir) {
		return nil
	}
	_ = os.Remove(link)
	if err := os.Symlink(filepath.Join("..", basesDir), link); err != nil {
		return err
	}
	return syncDir(p.snapDir())
}

// refValid reports whether a reference still stands for an image that
// reads base name: a volume with a record (or a hidden image) whose header
// names it, or a base that does.
func (p *pool) refValid(name, ref string) bool {
	switch {
	case strings.HasPrefix(ref, refVolume):
		file := strings.TrimPrefix(ref, refVolume)
		if checkVolumeID(file) != nil {
			return false
		}
		if _, err := os.Stat(filepath.Join(p.dir, file+metaSuffix)); err == nil && baseOf(filepath.Join(p.dir, file+imageSuffix)) == name {
			return true
		}
		return baseOf(filepath.Join(p.snapDir(), file+imageSuffix)) == name
	case strings.HasPrefix(ref, refBase):
		return baseOf(p.basePath(strings.TrimPrefix(ref, refBase))) == name
	}
	return false
}

// recoverBases removes what interrupted clones, deletions and flattens
// left among the bases: temporary files, references whose user is gone,
// bases without references. Like recover, it runs before any RPC is
// served; it returns what it removed.
func (p *pool) recoverBases() ([]string, error) {
	ents, err := readDirOrNone(p.baseDir())
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, e := range ents {
		if n := e.Name(); strings.HasPrefix(n, tmpPrefix) {
			if err := os.RemoveAll(filepath.Join(p.baseDir(), n)); err != nil {
				return removed, err
			}
			removed = append(removed, filepath.Join(basesDir, n))
		}
	}
	// Reference directories of bases never made, and the temporary files
	// of reference writes.
	for _, e := range ents {
		n := e.Name()
		if !e.IsDir() || !strings.HasSuffix(n, baseRefSuffix) {
			continue
		}
		tmps, _ := filepath.Glob(filepath.Join(p.baseDir(), n, tmpPrefix+"*"))
		for _, tmp := range tmps {
			if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return removed, err
			}
			rel, _ := filepath.Rel(p.dir, tmp)
			removed = append(removed, rel)
		}
		if _, err := os.Stat(p.basePath(strings.TrimSuffix(n, baseRefSuffix))); errors.Is(err, fs.ErrNotExist) {
			if err := os.RemoveAll(filepath.Join(p.baseDir(), n)); err != nil {
				return removed, err
			}
			removed = append(removed, filepath.Join(basesDir, n))
		}
	}
	// Removing a base can leave the one below without users: repeat until
	// nothing changes (chains are short).
	for changed := true; changed; {
		changed = false
		bases, err := p.listBases()
		if err != nil {
			return removed, err
		}
		for _, b := range bases {
			refs, err := p.refsOf(b)
			if err != nil {
				return removed, err
			}
			live := 0
			for _, r := range refs {
				if p.refValid(b, r) {
					live++
					continue
				}
				if err := removeDurably(filepath.Join(p.baseRefs(b), r)); err != nil {
					return removed, err
				}
				removed = append(removed, filepath.Join(basesDir, b+baseRefSuffix, r))
			}
			if live > 0 {
				continue
			}
			if err := removeDurably(p.basePath(b)); err != nil {
				return removed, err
			}
			if err := os.RemoveAll(p.baseRefs(b)); err != nil {
				return removed, err
			}
			removed = append(removed, filepath.Join(basesDir, b+imageSuffix))
			changed = true
		}
	}
	if len(removed) > 0 {
		return removed, syncDir(p.baseDir())
	}
	return nil, nil
}

// releaseImageBase drops volume vol's reference to base name once neither
// its live nor its hidden image reads it any more (a volume ID reused while
// an earlier volume of that ID is hidden shares the reference's name).
func (d *Driver) releaseImageBase(name, vol string) error {
	if name == "" {
		return nil
	}
	file := d.pool.file(vol)
	if baseOf(filepath.Join(d.pool.dir, file+imageSuffix)) == name || baseOf(filepath.Join(d.pool.snapDir(), file+imageSuffix)) == name {
		return nil
	}
	_, err := d.pool.dropRef(&d.bases, name, d.pool.volRef(vol))
	if err != nil {
		return fmt.Errorf("base %q: drop reference of volume %q: %w", name, vol, err)
	}
	return nil
}
