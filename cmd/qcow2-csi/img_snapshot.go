package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// `img snapshot`: qemu-img 7.2's snapshot sub-command. Same options (no -f:
// qemu-img snapshot has none), same listing layout, exit status 0 or 1.

func init() {
	registerImgCommand(imgCommand{
		name:  "snapshot",
		usage: "snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename",
		run:   runImgSnapshot,
	})
}

const snapshotHelp = `Usage: qcow2-csi img snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename

Lists, creates, applies (reverts to) or deletes internal snapshots of a qcow2
image, as qemu-img snapshot does.

  -l            list the snapshots (qemu-img's table layout)
  -c NAME       create a snapshot of the current disk state (metadata only);
                names longer than 255 bytes are cut, as qemu-img cuts them
  -a NAME|ID    apply: revert the disk to the snapshot (and to its disk size)
  -d NAME|ID    delete the snapshot (an ID is matched before a name)
  -q            quiet
  -U            open read-only without taking the image lock (listing only)
`

type snapshotAction int

const (
	snapNone snapshotAction = iota
	snapList
	snapCreate
	snapApply
	snapDelete
)

// qemuSnapshotNameMax is sizeof(QEMUSnapshotInfo.name)-1: qemu-img copies
// the name into a 256-byte buffer, so longer names are cut there.
const qemuSnapshotNameMax = 255

func runImgSnapshot(args []string) int {
	pa, err := parseArgs(args, argSpec{
		short: "la:c:d:hqU",
		long:  map[string]bool{"help": false, "object": true, "image-opts": false, "force-share": false},
	})
	if err != nil {
		return faceUsageError(err.Error())
	}
	var (
		action     snapshotAction
		name       string
		forceShare bool
	)
	for _, o := range pa.opts {
		switch o.name {
		case "h", "help":
			fmt.Print(snapshotHelp)
			return 0
		case "l", "a", "c", "d":
			if action != snapNone {
				return faceUsageError("Cannot mix '-l', '-a', '-c', '-d'")
			}
			action = map[string]snapshotAction{"l": snapList, "a": snapApply, "c": snapCreate, "d": snapDelete}[o.name]
			name = o.val
		case "q":
			// qemu-img snapshot prints nothing but the listing and errors,
			// and -q does not silence the listing: nothing to do.
		case "U", "force-share":
			forceShare = true
		}
	}
	if len(pa.pos) != 1 {
		return faceUsageError("Expecting one image file name")
	}
	ref, wipe, err := imageFromArgs(pa, pa.pos[0], "")
	if err != nil {
		return imgErr("%v", err)
	}
	defer wipe()
	filename := ref.path
	if forceShare && action != snapList && action != snapNone {
		// qemu-img: force-share needs a read-only open.
		return imgErr("Could not open '%s': force-share=on can only be used with read-only images", filename)
	}
	// Snapshots are metadata: an encrypted image needs no key here.
	img, err := qcow2.Open(filename, ref.openOptions(action == snapList, forceShare))
	if err != nil {
		if errors.Is(err, qcow2.ErrNotQcow2) {
			// qemu-img opens any format; formats without snapshots list
			// nothing and refuse the rest with ENOTSUP.
			switch action {
			case snapNone, snapList:
				return 0
			case snapCreate:
				return imgErr("Could not create snapshot '%s': -95 (Operation not supported)", name)
			case snapApply:
				return imgErr("Could not apply snapshot '%s': Operation not supported", name)
			case snapDelete:
				return imgErr("Could not delete snapshot '%s': snapshot not found", name)
			}
		}
		return imgErr("Could not open '%s': %v", filename, err)
	}
	rc := 0
	switch action {
	case snapList:
		writeSnapshotList(os.Stdout, img.Snapshots(), time.Local)
	case snapCreate:
		if len(name) > qemuSnapshotNameMax {
			name = name[:qemuSnapshotNameMax]
		}
		if _, err := img.CreateSnapshot(name); err != nil {
			rc = imgErr("Could not create snapshot '%s': %v", name, err)
		}
	case snapApply:
		if err := img.RevertToSnapshot(name); err != nil {
			rc = imgErr("Could not apply snapshot '%s': %v", name, err)
		}
	case snapDelete:
		if err := img.DeleteSnapshot(name); err != nil {
			if errors.Is(err, qcow2.ErrSnapshotNotFound) {
				rc = imgErr("Could not delete snapshot '%s': snapshot not found", name)
			} else {
				rc = imgErr("Could not delete snapshot '%s': %v", name, err)
			}
		}
	}
	if err := img.Close(); err != nil && rc == 0 {
		rc = imgErr("%s: %v", filename, err)
	}
	return rc
}

// writeSnapshotList prints snapshots in qemu-img's layout (block/qapi.c
// bdrv_snapshot_dump): nothing at all when there are none.
func writeSnapshotList(w io.Writer, snaps []qcow2.SnapshotInfo, loc *time.Location) {
	if len(snaps) == 0 {
		return
	}
	fmt.Fprintf(w, "Snapshot list:\n")
	fmt.Fprintf(w, "%s%s%s%s%s%s\n", padRight("ID", 10), padRight("TAG", 17),
		padLeft("VM SIZE", 8), padLeft("DATE", 20), padLeft("VM CLOCK", 13), padLeft("ICOUNT", 11))
	for _, s := range snaps {
		date := time.Unix(int64(s.DateSec), 0).In(loc).Format("2006-01-02 15:04:05")
		secs := s.VMClockNsec / 1e9
		clock := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, (s.VMClockNsec/1e6)%1000)
		icount := ""
		if s.Icount != -1 {
			icount = fmt.Sprintf("%d", s.Icount)
		}
		fmt.Fprintf(w, "%s %s %s%s%s%s\n", padRight(s.ID, 9), padRight(s.Name, 16),
			padLeft(qemuSizeToStr(s.VMStateSize), 8), padLeft(date, 20), padLeft(clock, 13), padLeft(icount, 11))
	}
}

// padRight and padLeft pad to a width in bytes, as printf("%-16s") does in
// C (Go's fmt counts runes, which differs for non-ASCII names).
func padRight(s string, n int) string {
	if len(s) >= n {
		return s
	}
	return s + strings.Repeat(" ", n-len(s))
}

func padLeft(s string, n int) string {
	if len(s) >= n {
		return s
	}
	return strings.Repeat(" ", n-len(s)) + s
}

// qemuSizeToStr is qemu's size_to_str (util/cutils.c): three significant
// digits and a binary suffix, switching unit once the value reaches 1000.
func qemuSizeToStr(v uint64) string {
	suffixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	_, e := math.Frexp(float64(v) / (1000.0 / 1024.0))
	i := (e - 1) / 10
	if i < 0 {
		i = 0
	}
	if i >= len(suffixes) {
		i = len(suffixes) - 1
	}
	div := float64(uint64(1) << (uint(i) * 10))
	return fmt.Sprintf("%.3g %sB", float64(v)/div, suffixes[i])
}

// snapshotSource is one internal snapshot of a qcow2 image as a convert
// source (convert -l): reads and block status through a SnapshotView.
type snapshotSource struct {
	*qcow2.SnapshotView
	img *qcow2.Image
}

func (s snapshotSource) Format() string { return "qcow2" }

func (s snapshotSource) Close() error {
	err := s.SnapshotView.Close()
	if cerr := s.img.Close(); err == nil {
		err = cerr
	}
	return err
}

// openSnapshotSource parses qemu-img's snapshot_param ("snapshot.id=ID,
// snapshot.name=NAME" or "ID_OR_NAME") and opens that snapshot of src.
// The export has the snapshot's own disk size (qemu-img 7.2 exports it at
// the image's current size when the two differ).
func openSnapshotSource(src imgFile, param string) (imgFile, error) {
	q, ok := src.(qcowFile)
	if !ok {
		src.Close()
		return nil, fmt.Errorf("Failed to load snapshot: %s images have no snapshots", src.Format())
	}
	var id, name string
	if strings.HasPrefix(param, "snapshot.") {
		for _, kv := range strings.Split(param, ",") {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "snapshot.id":
				id = v
			case "snapshot.name":
				name = v
			default:
				src.Close()
				return nil, fmt.Errorf("Invalid parameter '%s'\nFailed in parsing snapshot param '%s'", k, param)
			}
		}
	}
	var info qcow2.SnapshotInfo
	var err error
	if id == "" && name == "" {
		// ID_OR_NAME: an ID first, then a name, as qemu.
		if info, err = q.FindSnapshot(param, ""); err != nil {
			info, err = q.FindSnapshot("", param)
		}
	} else {
		info, err = q.FindSnapshot(id, name)
	}
	if err != nil {
		src.Close()
		return nil, fmt.Errorf("Failed to load snapshot: Can't find snapshot")
	}
	v, err := q.OpenSnapshot(info.ID)
	if err != nil {
		src.Close()
		return nil, fmt.Errorf("Failed to load snapshot: %v", err)
	}
	return snapshotSource{SnapshotView: v, img: q.Image}, nil
}
