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
			b, err := strconv.ParseBool(val)
			if err != nil {
				return v, fmt.Errorf("%w: parameter %s=%q: want true or false", ErrInvalid, k, val)
			}
			v.LazyRefcounts = b
		case paramFSType:
			if !supportedFSTypes[val] {
				return v, fmt.Errorf("%w: parameter %s=%q: want ext4 or xfs", ErrInvalid, k, val)
			}
			v.FSType = val
		case paramMkfsOptions:
			if _, err := splitMkfsOptions(val); err != nil {
				return v, fmt.Errorf("%w: parameter %s: %v", ErrInvalid, k, err)
			}
			v.MkfsOptions = val
		default:
			if strings.HasPrefix(k, k8sParamPrefix) {
				continue
			}
			return v, fmt.Errorf("%w: unknown parameter %q (known: %s, %s, %s, %s, %s)", ErrInvalid, k,
				paramClusterSize, paramPreallocation, paramLazyRefcounts, paramFSType, paramMkfsOptions)
		}
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
var mkfsArg = regexp.MustCompile(`^[A-Za-z0-9=,._:+/-]{1,128}$`)

func splitMkfsOptions(s string) ([]string, error) {
	f := strings.Fields(s)
	if len(f) > 32 {
		return nil, fmt.Errorf("%d mkfs arguments, at most 32", len(f))
	}
	for _, a := range f {
		if !mkfsArg.MatchString(a) {
			return nil, fmt.Errorf("mkfs argument %q has characters outside [A-Za-z0-9=,._:+/-] or is too long", a)
		}
	}
	return f, nil
}

// maxVirtualSize is the largest image a cluster size allows, the bound qemu
// enforces: an L1 table of at most 32 MiB (4 Mi entries), each L2 table one
// cluster of 8-byte entries.
func maxVirtualSize(clusterSize int64) int64 {
	cb := int64(bits.TrailingZeros64(uint64(clusterSize)))
	shift := 22 + (cb - 3) + cb
	if shift > 61 {
		shift = 61
	}
	return 1 << shift
}

// volumeSize picks the image size for a capacity range: the required bytes
// rounded up to the cluster size, or the default size when none is required,
// within the limit.
func volumeSize(cr *csi.CapacityRange, def, cluster int64) (int64, error) {
	req, lim := cr.GetRequiredBytes(), cr.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, fmt.Errorf("%w: capacity_range required_bytes %d / limit_bytes %d: negative", ErrInvalid, req, lim)
	}
	if lim > 0 && req > lim {
		return 0, fmt.Errorf("%w: capacity_range required_bytes %d exceeds limit_bytes %d", ErrInvalid, req, lim)
	}
	max := maxVirtualSize(cluster)
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
