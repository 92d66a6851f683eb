package driver

import (
	"fmt"
	"math/bits"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// StorageClass parameters (CreateVolumeRequest.parameters). Keys are matched
// exactly; anything else except the provisioner's own csi.storage.k8s.io/*
// keys is refused by name, so that a typo in a StorageClass fails loudly
// instead of silently giving defaults.
const (
	paramClusterSize   = "clusterSize"   // bytes, power of two 512..2M, k/K/M suffix allowed
	paramPreallocation = "preallocation" // off | metadata | falloc | full
	paramLazyRefcounts = "lazyRefcounts" // true | false
	paramFSType        = "fsType"        // ext4 | xfs (mount volumes)
	paramMkfsOptions   = "mkfsOptions"   // extra mkfs arguments, space separated
	paramEncrypted     = "encrypted"     // true | false: qcow2 LUKS, keyed from the Secret (encryption.go)
	paramExtendedL2    = "extendedL2"    // true | false: subclusters; default true for encrypted volumes
	paramCloneMode     = "cloneMode"     // overlay (default) | reflink | copy: how a clone or restore is made
	paramFlatten       = "flatten"       // true | false: copy a clone's base up into it, in the background
	paramMaxChainDepth = "maxChainDepth" // 1..16 backing layers a clone of a clone may have (default 4)
	// k8sParamPrefix marks keys the external-provisioner adds
	// (--extra-create-metadata) or strips itself; they carry no driver meaning.
	k8sParamPrefix = "csi.storage.k8s.io/"
)

// Volume context keys handed from CreateVolume to NodeStageVolume.
const (
	ctxFSType      = "fsType"
	ctxMkfsOptions = "mkfsOptions"
)

var supportedFSTypes = map[string]bool{"ext4": true, "xfs": true}

// preallocation modes, as qemu-img create -o preallocation=.
var preallocationModes = map[string]bool{"off": true, "metadata": true, "falloc": true, "full": true}

// volumeParams are the validated StorageClass parameters of a volume. They are
// stored in its metadata and compared on a repeated CreateVolume.
type volumeParams struct {
	ClusterSize   int64  `json:"clusterSize"`
	Preallocation string `json:"preallocation"`
	LazyRefcounts bool   `json:"lazyRefcounts"`
	FSType        string `json:"fsType,omitempty"`
	MkfsOptions   string `json:"mkfsOptions,omitempty"`
	Encrypted     bool   `json:"encrypted,omitempty"`
	// ExtendedL2 is the parameter as given: "" (the default: on for an
	// encrypted volume whose clusters allow it), "true" or "false". The
	// choice, not its effect, is recorded, so that records written before
	// it existed compare equal on a repeated CreateVolume.
	ExtendedL2 string `json:"extendedL2,omitempty"`
	// CloneMode is how a volume with a content source is made: "" (the
	// default, overlay), overlay, reflink or copy (overlay.go). Empty and
	// zero values are the defaults so that records written before these
	// fields existed still compare equal on a repeated CreateVolume.
	CloneMode     string `json:"cloneMode,omitempty"`
	Flatten       bool   `json:"flatten,omitempty"`
	MaxChainDepth int    `json:"maxChainDepth,omitempty"`
}

// Clone modes (paramCloneMode).
const (
	cloneOverlay = "overlay"
	cloneReflink = "reflink"
	cloneCopy    = "copy"
	// defaultMaxChainDepth bounds the backing chain below a clone made by
	// overlay: past it a base is copied flat (overlay.go).
	defaultMaxChainDepth = 4
	maxMaxChainDepth     = 16
)

// cloneMode is the effective clone mode.
func (v volumeParams) cloneMode() string {
	if v.CloneMode == "" {
		return cloneOverlay
	}
	return v.CloneMode
}

// minExtendedL2Cluster is the smallest cluster qcow2 allows subclusters in
// (32 of them, 512 bytes at least).
const minExtendedL2Cluster = 16 << 10

// extendedL2 reports whether a new image gets extended L2 entries
// (subclusters). On by default for encrypted volumes: a first write to a
// cluster then encrypts only the 2 KiB subclusters it touches (the others
// stay unallocated, reading as zeroes without being decrypted) instead of
// the whole 64 KiB cluster, its zero fill included: about ten times less
// work for a fresh volume's random 4 KiB writes (docs/encryption.md).
// QEMU reads such images from 5.2 on; extendedL2: "false" keeps them
// readable by older tools.
func (v volumeParams) extendedL2() bool {
	if v.ExtendedL2 != "" {
		return v.ExtendedL2 == "true"
	}
	return v.Encrypted && v.ClusterSize >= minExtendedL2Cluster
}

func (v volumeParams) maxChainDepth() int {
	if v.MaxChainDepth == 0 {
		return defaultMaxChainDepth
	}
	return v.MaxChainDepth
}

func parseParams(p map[string]string) (volumeParams, error) {
	v := volumeParams{ClusterSize: DefaultClusterSize, Preallocation: "off"}
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	sort.Strings(keys) // report the first bad key deterministically
	for _, k := range keys {
		val := p[k]
		switch k {
		case paramClusterSize:
			n, err := parseSize(val)
			if err != nil || n < 512 || n > 2<<20 || bits.OnesCount64(uint64(n)) != 1 {
				return v, fmt.Errorf("%w: parameter %s=%q: want a power of two between 512 and 2M", ErrInvalid, k, val)
			}
			v.ClusterSize = n
		case paramPreallocation:
			if !preallocationModes[val] {
				return v, fmt.Errorf("%w: parameter %s=%q: want off, metadata, falloc or full", ErrInvalid, k, val)
			}
			v.Preallocation = val
		case paramLazyRefcounts:
			b, err := boolParam(k, val)
			if err != nil {
				return v, err
			}
			v.LazyRefcounts = b
		case paramFSType:
			if !supportedFSTypes[val] {
				return v, fmt.Errorf("%w: parameter %s=%q: want ext4 or xfs", ErrInvalid, k, val)
			}
			v.FSType = val
		case paramEncrypted:
			b, err := boolParam(k, val)
			if err != nil {
				return v, err
			}
			v.Encrypted = b
		case paramExtendedL2:
			b, err := boolParam(k, val)
			if err != nil {
				return v, err
			}
			v.ExtendedL2 = strconv.FormatBool(b)
		case paramMkfsOptions:
			if _, err := splitMkfsOptions(val); err != nil {
				return v, fmt.Errorf("%w: parameter %s: %v", ErrInvalid, k, err)
			}
			v.MkfsOptions = val
		case paramCloneMode:
			switch val {
			case cloneOverlay, cloneReflink, cloneCopy:
			default:
				return v, fmt.Errorf("%w: parameter %s=%q: want overlay, reflink or copy", ErrInvalid, k, val)
			}
			if val != cloneOverlay {
				v.CloneMode = val
			}
		case paramFlatten:
			b, err := boolParam(k, val)
			if err != nil {
				return v, err
			}
			v.Flatten = b
		case paramMaxChainDepth:
			n, err := strconv.Atoi(val)
			if err != nil || n < 1 || n > maxMaxChainDepth {
				return v, fmt.Errorf("%w: parameter %s=%q: want a number of layers from 1 to %d", ErrInvalid, k, val, maxMaxChainDepth)
			}
			if n != defaultMaxChainDepth {
				v.MaxChainDepth = n
			}
		default:
			if strings.HasPrefix(k, k8sParamPrefix) {
				continue
			}
			return v, fmt.Errorf("%w: unknown parameter %q (known: %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", ErrInvalid, k,
				paramClusterSize, paramPreallocation, paramLazyRefcounts, paramFSType, paramMkfsOptions, paramEncrypted,
				paramExtendedL2, paramCloneMode, paramFlatten, paramMaxChainDepth)
		}
	}
	if v.Encrypted && v.Preallocation != "off" {
		return v, fmt.Errorf("%w: parameter %s=%s cannot be used with %s=true (preallocated clusters would decrypt to noise)", ErrInvalid, paramPreallocation, v.Preallocation, paramEncrypted)
	}
	if v.ExtendedL2 == "true" && !v.Encrypted {
		// Plain volumes meet overlays, flatten and the other clone modes,
		// not yet tested with subclusters in the driver.
		return v, fmt.Errorf("%w: parameter %s=true is for encrypted volumes (%s=true) only", ErrInvalid, paramExtendedL2, paramEncrypted)
	}
	if v.ExtendedL2 == "true" && v.ClusterSize < minExtendedL2Cluster {
		return v, fmt.Errorf("%w: parameter %s=true needs %s of at least 16K (have %d)", ErrInvalid, paramExtendedL2, paramClusterSize, v.ClusterSize)
	}
	return v, nil
}

// parseSize reads a byte count with an optional binary suffix (k, K, M, G).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'k', 'K':
			mult, s = 1<<10, s[:n-1]
		case 'M':
			mult, s = 1<<20, s[:n-1]
		case 'G':
			mult, s = 1<<30, s[:n-1]
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}

// mkfsArg is what one mkfs argument may contain: options, numbers, labels,
// key=value lists. No shell is involved, but refusing odd bytes keeps logs and
// error messages readable and rules out option smuggling through whitespace.
var mkfsArg = regexp.MustCompile(`^[A-Za-z0-9=,._:+/^-]{1,128}$`)

func splitMkfsOptions(s string) ([]string, error) {
	f := strings.Fields(s)
	if len(f) > 32 {
		return nil, fmt.Errorf("%d mkfs arguments, at most 32", len(f))
	}
	for _, a := range f {
		if !mkfsArg.MatchString(a) {
			return nil, fmt.Errorf("mkfs argument %q has characters outside [A-Za-z0-9=,._:+/^-] or is too long", a)
		}
	}
	return f, nil
}

// mkfsFlag is what the driver lets through of one mkfs option. The plugin
// runs mkfs as root on the host's filesystem, so an option that reads or
// writes anything but the new volume's device (a directory to copy in, a
// bad-block list, an undo file, an external journal or log device) would
// let whoever writes a StorageClass, or a volume context, reach the host.
type mkfsFlag struct {
	value bool // takes a value: the next argument
	// subs, when set, is the allowlist of the value's comma-separated
	// name[=value] sub-options.
	subs map[string]bool
	// refusedSubs are sub-options refused by name, and why.
	refusedSubs map[string]string
	// refused, when set, refuses the option and says why.
	refused string
	// values, when set, is the allowlist of the option's whole value;
	// valuesWhy says why the others are refused.
	values    map[string]bool
	valuesWhy string
}

func subs(names ...string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[n] = true
	}
	return m
}

// mkfsFlags are the options each filesystem's mkfs accepts from
// mkfsOptions; any other option is refused as not allowed. Refusals with a
// reason are the options known to touch more than the volume, or to make no
// usable filesystem. -F/-f (force) and the filesystem type are the
// driver's, not the StorageClass's.
var mkfsFlags = map[string]map[string]mkfsFlag{
	"ext4": {
		"-b": {value: true}, "-C": {value: true}, "-g": {value: true},
		// errors=panic in the superblock would let a full pool or one bad
		// volume take down the node's kernel, and every other volume on it.
		"-e": {value: true, values: subs("continue", "remount-ro"),
			valuesWhy: "an error on the volume would panic the node's kernel"},
		"-G": {value: true}, "-i": {value: true}, "-I": {value: true}, "-j": {},
		"-L": {value: true}, "-m": {value: true}, "-M": {value: true}, "-N": {value: true},
		"-O": {value: true}, "-q": {}, "-r": {value: true}, "-T": {value: true},
		"-U": {value: true}, "-v": {},
		"-E": {value: true, subs: subs("root_owner", "lazy_itable_init", "lazy_journal_init", "discard", "nodiscard",
			"stride", "stripe_width", "stripe-width", "resize", "packed_meta_blocks", "num_backup_sb",
			"quotatype", "encoding", "encoding_flags", "orphan_file_size", "assume_storage_prezeroed"),
			refusedSubs: map[string]string{"offset": "it puts the filesystem away from the device's start, where no mount finds it"}},
		"-J": {value: true, subs: subs("size", "fast_commit_size", "location"),
			refusedSubs: map[string]string{"device": "it puts the journal on another block device of the host"}},
		"-c": {refused: "it scans the device for bad blocks, which an image has none of"},
		"-d": {value: true, refused: "it copies a host directory or tarball into the volume"},
		"-D": {refused: "direct I/O is the attach backend's business"},
		"-F": {refused: "the driver decides about forcing"},
		"-l": {value: true, refused: "it reads a bad-block list from a host file"},
		"-n": {refused: "it makes no filesystem (dry run)"},
		"-S": {refused: "it writes superblocks only, over whatever the device holds"},
		"-t": {value: true, refused: "the filesystem type is the fsType parameter's"},
		"-V": {refused: "it prints the version and makes no filesystem"},
		"-z": {value: true, refused: "it writes an undo file to a host path"},
	},
	"xfs": {
		"-b": {value: true, subs: subs("size")},
		"-m": {value: true, subs: subs("crc", "finobt", "uuid", "rmapbt", "reflink", "inobtcount", "bigtime")},
		"-d": {value: true, subs: subs("agcount", "agsize", "su", "sunit", "sw", "swidth", "noalign",
			"cowextsize", "extszinherit", "daxinherit", "projinherit"),
			refusedSubs: map[string]string{
				"name": "it makes the data section on another host file or device",
				"file": "it makes the data section on a host file"}},
		"-i": {value: true, subs: subs("size", "perblock", "maxpct", "align", "attr", "projid32bit", "sparse", "nrext64")},
		"-l": {value: true, subs: subs("internal", "size", "version", "sunit", "su", "lazy-count"),
			refusedSubs: map[string]string{
				"logdev": "it puts the log on another block device of the host",
				"name":   "it puts the log on another host file or device",
				"file":   "it puts the log in a host file"}},
		"-n": {value: true, subs: subs("size", "version", "ftype")},
		"-s": {value: true, subs: subs("size")},
		"-L": {value: true}, "-q": {}, "-K": {},
		"-c": {value: true, refused: "it reads a configuration file from a host path"},
		"-f": {refused: "the driver decides about forcing"},
		"-N": {refused: "it makes no filesystem (dry run)"},
		"-p": {value: true, refused: "it populates the volume from a host prototype file or directory"},
		"-r": {value: true, refused: "a realtime section lives on another block device of the host"},
		"-V": {refused: "it prints the version and makes no filesystem"},
	},
}

// mkfsOptionsFor splits mkfsOptions and checks them against the allowlist
// of fsType's mkfs. Each option must be its own argument, its value the
// next one: getopt's bundled (-qd) and attached (-b4096) forms would let a
// refused option hide inside an allowed one.
func mkfsOptionsFor(fsType, s string) ([]string, error) {
	args, err := splitMkfsOptions(s)
	if err != nil {
		return nil, err
	}
	flags, ok := mkfsFlags[fsType]
	if !ok {
		return nil, fmt.Errorf("no mkfs options are known for filesystem %q", fsType)
	}
	tool := "mkfs." + fsType
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			return nil, fmt.Errorf("mkfs argument %q is not an option: the driver gives the device", a)
		}
		if len(a) != 2 || a == "--" {
			return nil, fmt.Errorf("mkfs argument %q: write each option as its own argument, its value as the next one (-b 4096)", a)
		}
		f, ok := flags[a]
		switch {
		case !ok:
			return nil, fmt.Errorf("%s option %s is not allowed (allowed: %s)", tool, a, allowedFlags(flags))
		case f.refused != "":
			return nil, fmt.Errorf("%s option %s is refused: %s", tool, a, f.refused)
		case !f.value:
			continue
		}
		if i+1 == len(args) {
			return nil, fmt.Errorf("%s option %s needs a value", tool, a)
		}
		i++
		if f.values != nil && !f.values[args[i]] {
			return nil, fmt.Errorf("%s option %s %s is refused: %s (allowed: %s)", tool, a, args[i], f.valuesWhy, strings.Join(sortedKeys(f.values), ", "))
		}
		if f.subs == nil {
			continue
		}
		for _, sub := range strings.Split(args[i], ",") {
			name, _, _ := strings.Cut(sub, "=")
			if why, bad := f.refusedSubs[name]; bad {
				return nil, fmt.Errorf("%s %s sub-option %s is refused: %s", tool, a, name, why)
			}
			if !f.subs[name] {
				return nil, fmt.Errorf("%s %s sub-option %s is not allowed (allowed: %s)", tool, a, name, strings.Join(sortedKeys(f.subs), ", "))
			}
		}
	}
	return args, nil
}

func allowedFlags(flags map[string]mkfsFlag) string {
	var ok []string
	for n, f := range flags {
		if f.refused == "" {
			ok = append(ok, n)
		}
	}
	// -b -C -e -E ...: the order of a man page.
	sort.Slice(ok, func(i, j int) bool {
		li, lj := strings.ToLower(ok[i]), strings.ToLower(ok[j])
		return li < lj || (li == lj && ok[i] > ok[j])
	})
	return strings.Join(ok, " ")
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// maxVirtualSize is the largest image a cluster size allows, the bound qemu
// enforces: an L1 table of at most 32 MiB (4 Mi entries), each L2 table one
// cluster of 8-byte entries, or of 16-byte ones with extended L2 (half the
// size).
func maxVirtualSize(clusterSize int64, extendedL2 bool) int64 {
	cb := int64(bits.TrailingZeros64(uint64(clusterSize)))
	entryBits := int64(3)
	if extendedL2 {
		entryBits = 4
	}
	shift := 22 + (cb - entryBits) + cb
	if shift > 61 {
		shift = 61
	}
	return 1 << shift
}

// maxSize is the largest image these parameters allow (maxVirtualSize).
func (v volumeParams) maxSize() int64 { return maxVirtualSize(v.ClusterSize, v.extendedL2()) }

// volumeSize picks the image size for a capacity range: the required bytes
// rounded up to the cluster size, or the default size when none is required,
// within the limit of the volume's parameters.
func volumeSize(cr *csi.CapacityRange, def int64, p volumeParams) (int64, error) {
	cluster := p.ClusterSize
	req, lim := cr.GetRequiredBytes(), cr.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, fmt.Errorf("%w: capacity_range required_bytes %d / limit_bytes %d: negative", ErrInvalid, req, lim)
	}
	if lim > 0 && req > lim {
		return 0, fmt.Errorf("%w: capacity_range required_bytes %d exceeds limit_bytes %d", ErrInvalid, req, lim)
	}
	max := p.maxSize()
	size := req
	if size == 0 {
		size = def
		if lim > 0 && lim < size {
			size = lim / cluster * cluster
		}
	}
	if size > max {
		return 0, fmt.Errorf("%w: %d bytes requested, at most %d with cluster size %d", ErrOutOfRange, size, max, cluster)
	}
	size = (size + cluster - 1) / cluster * cluster
	if size == 0 || (lim > 0 && size > lim) {
		return 0, fmt.Errorf("%w: no multiple of the cluster size %d lies in [%d, %d]", ErrOutOfRange, cluster, req, lim)
	}
	return size, nil
}

// boolParam parses a true/false StorageClass parameter.
func boolParam(k, val string) (bool, error) {
	b, err := strconv.ParseBool(val)
	if err != nil {
		return false, fmt.Errorf("%w: parameter %s=%q: want true or false", ErrInvalid, k, val)
	}
	return b, nil
}
