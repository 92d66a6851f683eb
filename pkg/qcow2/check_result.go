package qcow2

import (
	"bytes"
	"fmt"
	"strconv"
)

// RepairMode says what Check may fix, as qemu-img check -r.
type RepairMode int

const (
	// RepairNone only reports.
	RepairNone RepairMode = iota
	// RepairLeaks frees clusters whose refcount is higher than their
	// references (and fixes COPIED flags when that is then safe).
	RepairLeaks
	// RepairAll also raises too-low refcounts, fixes COPIED flags, drops
	// references that point outside the image, and rebuilds the refcount
	// structures when they are themselves broken.
	RepairAll
)

func (m RepairMode) fixLeaks() bool  { return m >= RepairLeaks }
func (m RepairMode) fixErrors() bool { return m >= RepairAll }

// CheckResult is what Check found, in qemu's terms (BdrvCheckResult and
// qemu-img's ImageCheck): corruptions are references the refcounts do not
// cover or metadata that is wrong, leaks are refcounts no reference needs,
// check errors are failures of the check itself.
type CheckResult struct {
	CheckErrors      int64
	Corruptions      int64
	Leaks            int64
	CorruptionsFixed int64
	LeaksFixed       int64

	// ImageEndOffset is the end of the last cluster in use (referenced or
	// refcounted).
	ImageEndOffset int64
	// Cluster statistics of the active layer.
	TotalClusters      int64
	AllocatedClusters  int64
	FragmentedClusters int64
	CompressedClusters int64

	// Messages are the findings, one line each, worded as qemu-img check
	// prints them on stderr (ERROR ..., Leaked cluster ..., Repairing ...).
	Messages []string
	// InconsistentBitmaps names the persistent bitmaps that cannot be
	// trusted (found in use, or with extra data they do not allow us to
	// interpret). qemu-img check does not count these; we report them.
	InconsistentBitmaps []string
}

func (r *CheckResult) msg(format string, args ...any) {
	r.Messages = append(r.Messages, fmt.Sprintf(format, args...))
}

// ExitCode is qemu-img check's: 0 clean, 1 check failed, 2 corruptions,
// 3 leaks only.
func (r *CheckResult) ExitCode() int {
	switch {
	case r.CheckErrors > 0:
		return 1
	case r.Corruptions > 0:
		return 2
	case r.Leaks > 0:
		return 3
	}
	return 0
}

// MarshalCheckJSON renders r as qemu-img check --output=json does: the same
// field names, zero optional fields left out, and the same key order qemu
// prints, so the two outputs can be compared as text.
func (r *CheckResult) MarshalCheckJSON(filename, format string) []byte {
	var b bytes.Buffer
	first := true
	field := func(k, v string) {
		if !first {
			b.WriteString(",\n")
		}
		first = false
		fmt.Fprintf(&b, "    %q: %s", k, v)
	}
	opt := func(k string, v int64) {
		if v != 0 {
			field(k, strconv.FormatInt(v, 10))
		}
	}
	b.WriteString("{\n")
	opt("image-end-offset", r.ImageEndOffset)
	opt("compressed-clusters", r.CompressedClusters)
	opt("total-clusters", r.TotalClusters)
	opt("corruptions", r.Corruptions)
	opt("corruptions-fixed", r.CorruptionsFixed)
	field("check-errors", strconv.FormatInt(r.CheckErrors, 10))
	opt("leaks", r.Leaks)
	opt("leaks-fixed", r.LeaksFixed)
	opt("allocated-clusters", r.AllocatedClusters)
	field("filename", strconv.Quote(filename))
	field("format", strconv.Quote(format))
	opt("fragmented-clusters", r.FragmentedClusters)
	b.WriteString("\n}\n")
	return b.Bytes()
}

// HumanSummary is qemu-img check's human-readable report (stdout part).
func (r *CheckResult) HumanSummary() string {
	var b bytes.Buffer
	if r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0 {
		b.WriteString("No errors were found on the image.\n")
	} else {
		if r.Corruptions != 0 {
			fmt.Fprintf(&b, "\n%d errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", r.Corruptions)
		}
		if r.Leaks != 0 {
			fmt.Fprintf(&b, "\n%d leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", r.Leaks)
		}
		if r.CheckErrors != 0 {
			fmt.Fprintf(&b, "\n%d internal errors have occurred during the check.\n", r.CheckErrors)
		}
	}
	if r.TotalClusters != 0 && r.AllocatedClusters != 0 {
		fmt.Fprintf(&b, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			float64(r.AllocatedClusters)*100/float64(r.TotalClusters),
			float64(r.FragmentedClusters)*100/float64(r.AllocatedClusters),
			float64(r.CompressedClusters)*100/float64(r.AllocatedClusters))
	}
	if r.ImageEndOffset != 0 {
		fmt.Fprintf(&b, "Image end offset: %d\n", r.ImageEndOffset)
	}
	return b.String()
}
