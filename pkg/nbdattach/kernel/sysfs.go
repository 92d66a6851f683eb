package kernel

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// sysDevice is what /sys/block/nbdN says about one kernel NBD device.
type sysDevice struct {
	index int
	// backendID is /sys/block/nbdN/backend: the identifier given at CONNECT.
	// The file exists only while a netlink configuration holds the device.
	backendID string
	// pid is /sys/block/nbdN/pid: the process that configured the device
	// (0 when the file is absent, i.e. the device is not configured). The
	// kernel does not change it on RECONFIGURE, so after a Reattach it
	// still names the first, possibly dead, process.
	pid int
	// size in bytes (/sys/block/nbdN/size counts 512-byte sectors).
	size int64
}

func (d sysDevice) configured() bool { return d.pid != 0 || d.backendID != "" }

// readSysDevices lists the nbd devices under root (normally "/sys"), sorted
// by index. Devices that vanish while being read are skipped.
func readSysDevices(root string) ([]sysDevice, error) {
	dir := filepath.Join(root, "block")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("nbd: list %s: %w", dir, err)
	}
	var out []sysDevice
	for _, e := range ents {
		idx, ok := parseNBDName(e.Name())
		if !ok {
			continue
		}
		d, err := readSysDevice(root, idx)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].index < out[j].index })
	return out, nil
}

// parseNBDName returns N for "nbdN" (and not for partitions like "nbd0p1").
func parseNBDName(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "nbd")
	if !ok || rest == "" || len(rest) > 7 || (len(rest) > 1 && rest[0] == '0') {
		return 0, false
	}
	for _, c := range rest {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// readSysDevice reads one device. An absent backend or pid file is normal
// (an unconfigured device); an absent size file means the device is gone.
func readSysDevice(root string, index int) (sysDevice, error) {
	dir := filepath.Join(root, "block", "nbd"+strconv.Itoa(index))
	d := sysDevice{index: index}
	sectors, err := readSysInt(filepath.Join(dir, "size"))
	if err != nil {
		return d, err
	}
	if sectors < 0 || sectors > (1<<63-1)/512 {
		return d, fmt.Errorf("nbd: %s/size: %d sectors out of range", dir, sectors)
	}
	d.size = sectors * 512
	pid, err := readSysInt(filepath.Join(dir, "pid"))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return d, err
	default:
		d.pid = int(pid)
	}
	b, err := os.ReadFile(filepath.Join(dir, "backend"))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return d, fmt.Errorf("nbd: %w", err)
	default:
		d.backendID = strings.TrimSuffix(string(b), "\n")
	}
	return d, nil
}

func readSysInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("nbd: %w", err)
	}
	s := strings.TrimSpace(string(b))
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("nbd: %s: %q is not a number", path, s)
	}
	return n, nil
}

// findByBackendID returns the configured device recorded with id.
func findByBackendID(devs []sysDevice, id string) (sysDevice, bool) {
	if id == "" {
		return sysDevice{}, false
	}
	for _, d := range devs {
		if d.configured() && d.backendID == id {
			return d, true
		}
	}
	return sysDevice{}, false
}
