package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

// File names in the pool directory. A volume is <id>.qcow2 plus <id>.json;
// temporary files start with a dot so that they never look like a volume.
const (
	imageSuffix = ".qcow2"
	metaSuffix  = ".json"
	tmpPrefix   = ".tmp-"
	stagedDir   = ".staged" // node records of staged volumes (node.go)
	metaVersion = 1
)

// volumeMeta is the committed record of a volume.
type volumeMeta struct {
	Version  int          `json:"version"`
	ID       string       `json:"id"`
	Name     string       `json:"name"`
	Capacity int64        `json:"capacityBytes"`
	Params   volumeParams `json:"parameters"`
	Created  time.Time    `json:"created"`
	// QoS are the I/O limits (mutable parameters, qos.go); nil: none.
	QoS *throttle.Limits `json:"qos,omitempty"`
	// Flatten is set while the volume's base is being copied up into it
	// (flatten.go): the background flatten resumes at start.
	Flatten *flattenState `json:"flatten,omitempty"`
}

// pool is the on-disk store of volumes in one directory. It does no locking
// of its own: callers hold the volume's operation lock (oplock.go), and every
// mutation is a single atomic rename, so readers never see half a record.
type pool struct {
	dir string
	// node is the node this pool belongs to: IDs qualified with it are
	// stored under their local part (ids.go).
	node string
}

// Modes of the pool: a volume's image is a whole disk's data, readable by
// the driver alone, as its record is (writeFileAtomic's temporary files are
// 0600). The directory is the driver's alone as well, so that a file
// someone else makes there with a wider mode is still out of other users'
// reach.
const (
	poolDirMode   fs.FileMode = 0o700
	poolImageMode fs.FileMode = 0o600
)

func openPool(dir, node string) (*pool, error) {
	if err := os.MkdirAll(dir, poolDirMode); err != nil {
		return nil, fmt.Errorf("pool %s: %w", dir, err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	return &pool{dir: abs, node: node}, nil
}

// volumeIDForName maps a CSI volume name to its ID deterministically, so that
// a CreateVolume retried after a crash or restart finds the same volume. The
// hash keeps IDs short and free of characters names may contain.
func volumeIDForName(name string) string {
	sum := sha256.Sum256([]byte("qcow2-csi volume\x00" + name))
	return "vol-" + hex.EncodeToString(sum[:16])
}

// file is the name stem of volume id's files: its local part when the ID
// is this node's or legacy. Another node's ID keeps its suffix, a name no
// volume file has, so that it finds nothing here and can never reach a
// local volume of the same local part.
func (p *pool) file(id string) string {
	local, o := splitOwner(id)
	if o.legacy() || o.is(p.node) {
		return local
	}
	return id
}

func (p *pool) imagePath(id string) string { return filepath.Join(p.dir, p.file(id)+imageSuffix) }
func (p *pool) metaPath(id string) string  { return p.volumes().path(p.file(id)) }

// tempPath is where an image for id is built before it is renamed into
// place (the caller holds id's operation lock, so the name is its own).
func (p *pool) tempPath(id, suffix string) string {
	return filepath.Join(p.dir, tmpPrefix+p.file(id)+suffix)
}

// get reads a volume's metadata; ErrNotFound when it has none. The record
// must carry id itself: a legacy ID does not reach a volume issued with a
// qualified one, so each volume has one ID (and one lock key).
func (p *pool) get(id string) (*volumeMeta, error) {
	m, err := p.getFile(p.file(id))
	if err != nil {
		return nil, err
	}
	if m.ID != id {
		return nil, fmt.Errorf("volume %q: metadata %s names volume %q", id, p.metaPath(id), m.ID)
	}
	return m, nil
}

// getFile reads the metadata of the volume stored under name (list's
// names).
func (p *pool) getFile(name string) (*volumeMeta, error) {
	var m volumeMeta
	if err := p.volumes().get(name, &m); err != nil {
		return nil, err
	}
	if p.file(m.ID) != name || m.Version != metaVersion {
		return nil, fmt.Errorf("volume %q: metadata %s names volume %q version %d", name, p.volumes().path(name), m.ID, m.Version)
	}
	return &m, nil
}

// put commits a volume's metadata atomically: write a temporary file, fsync
// it, rename it over the old one, fsync the directory so the rename survives
// a power cut.
func (p *pool) put(m *volumeMeta) error {
	m.Version = metaVersion
	return p.volumes().put(p.file(m.ID), m)
}

// remove deletes a volume: its metadata first (the commit point), then its
// image. A crash between the two leaves an image without metadata, which
// recover removes.
func (p *pool) remove(id string) error {
	if err := p.volumes().remove(p.file(id)); err != nil {
		return err
	}
	if err := os.Remove(p.imagePath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// list returns the file names of the committed volumes, sorted (getFile
// reads their records, which hold their IDs).
func (p *pool) list() ([]string, error) {
	names, err := p.volumes().names()
	if err != nil {
		return nil, err
	}
	ids := names[:0]
	for _, id := range names {
		if checkVolumeID(id) == nil {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// recover removes what interrupted operations left: temporary files and
// images without metadata. It runs once at start, before any RPC is served,
// so no operation can be in flight. It returns the removed names.
func (p *pool) recover() ([]string, error) {
	ents, err := os.ReadDir(p.dir)
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, e := range ents {
		n := e.Name()
		if !e.Type().IsRegular() {
			continue
		}
		orphan := false
		switch {
		case strings.HasPrefix(n, tmpPrefix):
			orphan = true
		case strings.HasSuffix(n, imageSuffix) && !strings.HasPrefix(n, "."):
			id := strings.TrimSuffix(n, imageSuffix)
			if checkVolumeID(id) != nil {
				continue // not ours: leave foreign files alone
			}
			if _, err := os.Stat(p.metaPath(id)); errors.Is(err, fs.ErrNotExist) {
				orphan = true
			}
		}
		if orphan {
			if err := os.Remove(filepath.Join(p.dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return removed, err
			}
			removed = append(removed, n)
		}
	}
	if len(removed) > 0 {
		return removed, syncDir(p.dir)
	}
	return nil, nil
}

// restrict narrows the pool directory to poolDirMode and the driver's
// images in it (and hidden ones among the snapshot records) to
// poolImageMode, keeping only bits both allow. A hostPath the kubelet made
// (DirectoryOrCreate: 0755) and images an older driver made (0644) are
// narrowed this way; foreign files are left alone. It returns what it
// changed, "path: old -> new", for the start-up log.
func (p *pool) restrict() ([]string, error) {
	var changed []string
	var errs []error
	narrow := func(path string, fi fs.FileInfo, want fs.FileMode) {
		old := fi.Mode().Perm()
		if old&^want == 0 {
			return
		}
		if err := os.Chmod(path, old&want); err != nil {
			errs = append(errs, err)
			return
		}
		changed = append(changed, fmt.Sprintf("%s: %#o -> %#o", path, old, old&want))
	}
	fi, err := os.Stat(p.dir)
	if err != nil {
		return nil, err
	}
	narrow(p.dir, fi, poolDirMode)
	for _, dir := range []string{p.dir, p.snapDir()} {
		ents, err := os.ReadDir(dir)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, e := range ents {
			n := e.Name()
			if !e.Type().IsRegular() || !strings.HasSuffix(n, imageSuffix) || checkVolumeID(strings.TrimSuffix(n, imageSuffix)) != nil {
				continue
			}
			if fi, err := e.Info(); err == nil {
				narrow(filepath.Join(dir, n), fi, poolImageMode)
			}
		}
	}
	return changed, errors.Join(errs...)
}

// space reports the pool filesystem's size and the bytes available to an
// unprivileged writer.
func (p *pool) space() (total, avail int64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(p.dir, &st); err != nil {
		return 0, 0, fmt.Errorf("statfs %s: %w", p.dir, err)
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, nil
}

// writable checks that the pool accepts a durable write (Probe).
func (p *pool) writable() error {
	return writeFileAtomic(filepath.Join(p.dir, ".probe"), []byte("ok\n"))
}

// allocatedBytes is the space an image file occupies (qemu-img info's "disk
// size").
func allocatedBytes(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}

// writeFileAtomic replaces path with data so that a reader or a crash sees
// either the old or the new content, never a mix.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), tmpPrefix+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}

// removeDurably removes path (one already gone is fine) and syncs its
// directory, so that the removal survives a crash.
func removeDurably(path string) error {
	err := os.Remove(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if serr := syncDir(filepath.Dir(path)); serr != nil && !(err != nil && errors.Is(serr, fs.ErrNotExist)) {
		return serr // (no directory and no file: nothing to make durable)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
