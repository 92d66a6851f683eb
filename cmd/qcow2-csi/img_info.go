package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

func init() {
	registerImgCommand(imgCommand{
		name:  "info",
		usage: "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
		run:   runImgInfo,
	})
}

// infoJSON has qemu-img 7.2's field names (ImageInfo in qapi/block-core.json).
type infoJSON struct {
	Snapshots             []snapshotJSON  `json:"snapshots,omitempty"`
	BackingFilenameFormat string          `json:"backing-filename-format,omitempty"`
	VirtualSize           int64           `json:"virtual-size"`
	Filename              string          `json:"filename"`
	ClusterSize           int64           `json:"cluster-size,omitempty"`
	Format                string          `json:"format"`
	ActualSize            int64           `json:"actual-size"`
	FormatSpecific        *formatSpecific `json:"format-specific,omitempty"`
	FullBackingFilename   string          `json:"full-backing-filename,omitempty"`
	BackingFilename       string          `json:"backing-filename,omitempty"`
	Encrypted             bool            `json:"encrypted,omitempty"`
	DirtyFlag             bool            `json:"dirty-flag"`
}

type snapshotJSON struct {
	Icount      *int64 `json:"icount,omitempty"`
	VMClockNsec uint64 `json:"vm-clock-nsec"`
	Name        string `json:"name"`
	DateSec     uint32 `json:"date-sec"`
	DateNsec    uint32 `json:"date-nsec"`
	VMClockSec  uint64 `json:"vm-clock-sec"`
	ID          string `json:"id"`
	VMStateSize uint64 `json:"vm-state-size"`
}

type formatSpecific struct {
	Type string     `json:"type"`
	Data qcow2Specs `json:"data"`
}

type qcow2Specs struct {
	Compat          string                `json:"compat"`
	CompressionType string                `json:"compression-type"`
	LazyRefcounts   *bool                 `json:"lazy-refcounts,omitempty"`
	Bitmaps         []bitmapJSON          `json:"bitmaps,omitempty"`
	RefcountBits    int                   `json:"refcount-bits"`
	Encrypt         *qcow2.EncryptionInfo `json:"encrypt,omitempty"`
	Corrupt         *bool                 `json:"corrupt,omitempty"`
	ExtendedL2      *bool                 `json:"extended-l2,omitempty"`
}

type bitmapJSON struct {
	Flags       []string `json:"flags"`
	Name        string   `json:"name"`
	Granularity int64    `json:"granularity"`
}

func runImgInfo(args []string) int {
	pa, err := parseArgs(args, argSpec{short: "f:hU", long: map[string]bool{"output": true, "backing-chain": false, "force-share": false, "help": false, "object": true, "image-opts": false}})
	if err != nil {
		return imgErr("%v", err)
	}
	if pa.wantsHelp("info") {
		return 0
	}
	if len(pa.pos) != 1 {
		return imgErr("Expecting one image file name")
	}
	output, err := pa.outputFormat()
	if err != nil {
		return imgErr("%v", err)
	}
	format, _ := pa.get("f")
	share := pa.has("U") || pa.has("force-share")
	// Info reads metadata only: an encrypted image needs no key, but the
	// qemu-img command line with --object and --image-opts works too.
	ref, wipe, err := imageFromArgs(pa, pa.pos[0], format)
	if err != nil {
		return imgErr("%v", err)
	}
	defer wipe()
	path, format := ref.path, ref.format
	var chain []infoJSON
	for path != "" {
		in, next, err := imageInfo(path, format, share)
		if err != nil {
			return imgErr("%v", err)
		}
		chain = append(chain, in)
		if !pa.has("backing-chain") {
			break
		}
		path, format = next, in.BackingFilenameFormat
	}
	if output == "json" {
		var b []byte
		if pa.has("backing-chain") {
			b, _ = json.MarshalIndent(chain, "", "    ")
		} else {
			b, _ = json.MarshalIndent(chain[0], "", "    ")
		}
		fmt.Println(string(b))
		return 0
	}
	for i, in := range chain {
		if i > 0 {
			fmt.Println()
		}
		printInfoHuman(in)
	}
	return 0
}

// imageInfo gathers what qemu-img info prints; next is the backing file
// to follow for --backing-chain.
func imageInfo(path, format string, share bool) (infoJSON, string, error) {
	if format == "" {
		f, err := probeFormat(path)
		if err != nil {
			return infoJSON{}, "", fmt.Errorf("Could not open '%s': %v", path, unwrapPathErr(err))
		}
		format = f
	}
	if format == "raw" {
		st, err := os.Stat(path)
		if err != nil {
			return infoJSON{}, "", fmt.Errorf("Could not open '%s': %v", path, unwrapPathErr(err))
		}
		in := infoJSON{VirtualSize: st.Size(), Filename: path, Format: "raw", ActualSize: diskUsage(path)}
		return in, "", nil
	}
	if format != "qcow2" {
		return infoJSON{}, "", fmt.Errorf("Unknown driver '%s' (supported: qcow2, raw)", format)
	}
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoLock: share, NoBacking: true})
	if err != nil {
		return infoJSON{}, "", fmt.Errorf("Could not open '%s': %v", path, unwrapPathErr(err))
	}
	defer img.Close()
	q, err := img.Info()
	if err != nil {
		return infoJSON{}, "", err
	}
	in := infoJSON{
		VirtualSize:           q.VirtualSize,
		Filename:              path,
		ClusterSize:           q.ClusterSize,
		Format:                "qcow2",
		ActualSize:            q.ActualSize,
		BackingFilename:       q.BackingFile,
		FullBackingFilename:   q.FullBackingFile,
		BackingFilenameFormat: q.BackingFormat,
		DirtyFlag:             q.Dirty,
		FormatSpecific:        &formatSpecific{Type: "qcow2", Data: qcow2Specs{Compat: q.Compat, CompressionType: q.CompressionType, RefcountBits: q.RefcountBits}},
	}
	if e := img.Encryption(); e != nil {
		in.Encrypted, in.FormatSpecific.Data.Encrypt = true, e
	}
	if q.Version >= 3 {
		d := &in.FormatSpecific.Data
		d.LazyRefcounts, d.Corrupt, d.ExtendedL2 = &q.LazyRefcounts, &q.Corrupt, &q.ExtendedL2
	}
	for _, b := range q.Bitmaps {
		in.FormatSpecific.Data.Bitmaps = append(in.FormatSpecific.Data.Bitmaps, bitmapJSON{Flags: b.Flags, Name: b.Name, Granularity: b.Granularity})
	}
	for _, s := range q.Snapshots {
		sj := snapshotJSON{VMClockNsec: s.VMClockNsec % 1e9, VMClockSec: s.VMClockNsec / 1e9, Name: s.Name, DateSec: s.DateSec, DateNsec: s.DateNsec, ID: s.ID, VMStateSize: s.VMStateSize}
		if s.Icount >= 0 {
			ic := s.Icount
			sj.Icount = &ic
		}
		in.Snapshots = append(in.Snapshots, sj)
	}
	return in, q.FullBackingFile, nil
}

func diskUsage(path string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	return fileBlocks(f)
}

// sizeToStr is qemu's size_to_str: three significant digits, binary units,
// switching unit once the integer part reaches 1000.
func sizeToStr(v int64) string {
	suffixes := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	_, e := math.Frexp(float64(v) / (1000.0 / 1024.0))
	i := (e - 1) / 10
	if i < 0 {
		i = 0
	}
	return fmt.Sprintf("%.3g %s", float64(v)/float64(uint64(1)<<(10*i)), suffixes[i])
}

func printInfoHuman(in infoJSON) {
	fmt.Printf("image: %s\n", in.Filename)
	fmt.Printf("file format: %s\n", in.Format)
	fmt.Printf("virtual size: %s (%d bytes)\n", sizeToStr(in.VirtualSize), in.VirtualSize)
	fmt.Printf("disk size: %s\n", sizeToStr(in.ActualSize))
	if in.Encrypted {
		fmt.Println("encrypted: yes")
	}
	if in.ClusterSize != 0 {
		fmt.Printf("cluster_size: %d\n", in.ClusterSize)
	}
	if in.BackingFilename != "" {
		fmt.Printf("backing file: %s", in.BackingFilename)
		if in.FullBackingFilename != in.BackingFilename {
			fmt.Printf(" (actual path: %s)", in.FullBackingFilename)
		}
		fmt.Println()
		if in.BackingFilenameFormat != "" {
			fmt.Printf("backing file format: %s\n", in.BackingFilenameFormat)
		}
	}
	if in.DirtyFlag {
		fmt.Println("cleanly shut down: no")
	}
	if len(in.Snapshots) > 0 {
		fmt.Println("Snapshot list:")
		fmt.Printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
		for _, s := range in.Snapshots {
			date := time.Unix(int64(s.DateSec), 0).Format("2006-01-02 15:04:05")
			ns := s.VMClockSec*1e9 + s.VMClockNsec
			clock := fmt.Sprintf("%02d:%02d:%02d.%03d", ns/3600e9, ns/60e9%60, ns/1e9%60, ns/1e6%1000)
			ic := ""
			if s.Icount != nil {
				ic = fmt.Sprint(*s.Icount)
			}
			fmt.Printf("%-9s %-17s%8s%20s%13s%11s\n", s.ID, s.Name, sizeToStr(int64(s.VMStateSize)), date, clock, ic)
		}
	}
	if fs := in.FormatSpecific; fs != nil {
		d := fs.Data
		fmt.Println("Format specific information:")
		fmt.Printf("    compat: %s\n", d.Compat)
		fmt.Printf("    compression type: %s\n", d.CompressionType)
		if d.LazyRefcounts != nil {
			fmt.Printf("    lazy refcounts: %t\n", *d.LazyRefcounts)
		}
		if len(d.Bitmaps) > 0 {
			fmt.Println("    bitmaps:")
			for i, b := range d.Bitmaps {
				fmt.Printf("        [%d]:\n", i)
				fmt.Println("            flags:")
				for j, f := range b.Flags {
					fmt.Printf("                [%d]: %s\n", j, f)
				}
				fmt.Printf("            name: %s\n", b.Name)
				fmt.Printf("            granularity: %d\n", b.Granularity)
			}
		}
		fmt.Printf("    refcount bits: %d\n", d.RefcountBits)
		if e := d.Encrypt; e != nil {
			printEncryptHuman(e)
		}
		if d.Corrupt != nil {
			fmt.Printf("    corrupt: %t\n", *d.Corrupt)
		}
		if d.ExtendedL2 != nil {
			fmt.Printf("    extended l2: %t\n", *d.ExtendedL2)
		}
	}
}

// printEncryptHuman prints the LUKS part as qemu-img info does.
func printEncryptHuman(e *qcow2.EncryptionInfo) {
	fmt.Println("    encrypt:")
	fmt.Printf("        ivgen alg: %s\n", e.IvgenAlg)
	fmt.Printf("        hash alg: %s\n", e.HashAlg)
	fmt.Printf("        cipher alg: %s\n", e.CipherAlg)
	fmt.Printf("        uuid: %s\n", e.UUID)
	fmt.Printf("        format: %s\n", e.Format)
	fmt.Printf("        cipher mode: %s\n", e.CipherMode)
	fmt.Println("        slots:")
	for i, s := range e.Slots {
		fmt.Printf("            [%d]:\n", i)
		fmt.Printf("                active: %t\n", s.Active)
		if s.Iters != nil {
			fmt.Printf("                iters: %d\n", *s.Iters)
		}
		fmt.Printf("                key offset: %d\n", s.KeyOffset)
		if s.Stripes != nil {
			fmt.Printf("                stripes: %d\n", *s.Stripes)
		}
	}
	fmt.Printf("        payload offset: %d\n", e.PayloadOffset)
	fmt.Printf("        master key iters: %d\n", e.MasterKeyIters)
}
