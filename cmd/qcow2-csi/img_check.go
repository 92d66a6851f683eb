package main

import (
	"fmt"
	"os"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

func init() {
	registerImgCommand(imgCommand{
		name:  "check",
		usage: "check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename",
		run:   runImgCheck,
	})
}

const imgCheckHelp = `Usage: qcow2-csi img check [-q] [-f qcow2] [--output=human|json] [-r leaks|all] [-U] FILE

Checks a qcow2 image for consistency, as qemu-img check does: every cluster's
refcount against its references (L1/L2 tables of the active layer and of
every snapshot, data and compressed clusters, refcount table and blocks,
snapshot table, bitmap directory and tables), COPIED flags, and statistics.

  -r leaks   free leaked clusters
  -r all     also fix corruptions: too-low refcounts, COPIED flags,
             references past the end of the file, and rebuild broken
             refcount structures (the new table goes where it fits)
  --output   human (default) or json (qemu-img's field names)
  -U         do not take the image lock (force-share)
  --object secret,... and --image-opts are accepted as qemu-img takes them
             for an encrypted image; the check itself needs no key
  -q         quiet

Exit codes: 0 no errors, 1 check failed, 2 corruptions, 3 leaks only.
`

func runImgCheck(args []string) int {
	pa, err := parseArgs(args, argSpec{
		short: "hf:r:qU",
		long: map[string]bool{"help": false, "format": true, "repair": true, "output": true, "quiet": false, "force-share": false,
			"object": true, "image-opts": false},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "qcow2-csi img check: %v\n%s", err, imgCheckHelp)
		return 1
	}
	var (
		output = "human"
		repair string
		quiet  bool
		share  bool
		files  = pa.pos
	)
	for _, o := range pa.opts {
		switch o.name {
		case "h", "help":
			fmt.Print(imgCheckHelp)
			return 0
		case "q", "quiet":
			quiet = true
		case "U", "force-share":
			share = true
		case "f", "format":
			if o.val != "qcow2" {
				fmt.Fprintf(os.Stderr, "qcow2-csi img check: only -f qcow2 is supported\n")
				return 1
			}
		case "r", "repair":
			if o.val != "leaks" && o.val != "all" {
				fmt.Fprintf(os.Stderr, "qcow2-csi img check: --repair (-r) expects 'leaks' or 'all', not '%s'\n", o.val)
				return 1
			}
			repair = o.val
		case "output":
			if o.val != "human" && o.val != "json" {
				fmt.Fprintf(os.Stderr, "qcow2-csi img check: --output must be human or json\n")
				return 1
			}
			output = o.val
		}
	}
	if len(files) != 1 {
		fmt.Fprintf(os.Stderr, "qcow2-csi img check: expecting one image file name\n")
		return 1
	}
	if repair != "" && share {
		fmt.Fprintf(os.Stderr, "qcow2-csi img check: -r cannot be combined with -U\n")
		return 1
	}
	mode := qcow2.RepairNone
	switch repair {
	case "leaks":
		mode = qcow2.RepairLeaks
	case "all":
		mode = qcow2.RepairAll
	}
	// An encrypted image is checked without its key (only metadata is
	// read); --object and --image-opts are taken so that qemu-img's
	// command line for one works unchanged.
	ia, err := newImageArgs(pa)
	if err == nil {
		defer ia.secrets.wipe()
	}
	var ref imageRef
	if err == nil {
		ref, err = ia.ref(files[0], "")
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "qcow2-csi img check: %v\n", err)
		return 1
	}
	name := ref.path
	img, err := qcow2.OpenForCheck(name, qcow2.OpenOptions{ReadOnly: mode == qcow2.RepairNone, NoLock: share})
	if err != nil {
		fmt.Fprintf(os.Stderr, "qcow2-csi img check: Could not open '%s': %v\n", name, err)
		return 1
	}
	res, err := img.Check(mode)
	if cerr := img.Close(); err == nil && cerr != nil && mode != qcow2.RepairNone {
		err = cerr
	}
	if res != nil {
		for _, m := range res.Messages {
			fmt.Fprintln(os.Stderr, m)
		}
		for _, b := range res.InconsistentBitmaps {
			fmt.Fprintf(os.Stderr, "Bitmap '%s' is inconsistent (it was in use when its writer stopped); it can only be removed\n", b)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "qcow2-csi img check: Check failed: %v\n", err)
		return 1
	}
	if !quiet {
		if output == "json" {
			os.Stdout.Write(res.MarshalCheckJSON(name, "qcow2"))
		} else {
			if res.CorruptionsFixed != 0 || res.LeaksFixed != 0 {
				fmt.Printf("The following inconsistencies were found and repaired:\n\n    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n", res.LeaksFixed, res.CorruptionsFixed)
			}
			fmt.Print(res.HumanSummary())
		}
	}
	if res.CheckErrors != 0 {
		fmt.Fprintf(os.Stderr, "qcow2-csi img check: Check failed\n")
	}
	return res.ExitCode()
}
