package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// `img amend`: qemu-img 7.2's amend sub-command for qcow2: compat,
// lazy_refcounts, refcount_bits, size, and (beyond qemu-img 7.2, which sends
// users to `rebase -u` for it) backing_file/backing_fmt as a metadata-only
// change.

func init() {
	registerImgCommand(imgCommand{
		name:  "amend",
		usage: "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename",
		run:   runImgAmend,
	})
}

const amendHelp = `Usage: qcow2-csi img amend [-p] [-q] [-f qcow2] [-t cache] [--force] -o options filename

Changes format options of an existing qcow2 image in place, as qemu-img amend
does. Options (comma separated, ",," for a literal comma; -o may repeat):

  compat=0.10|v2|1.1|v3  downgrade or upgrade the format version; a downgrade
                         expands zero clusters and is refused with the reason
                         when refcount_bits is not 16, with extended L2, an
                         external data file, zstd-compressed clusters,
                         persistent bitmaps, or snapshots v2 cannot describe
  lazy_refcounts=on|off  postpone refcount updates (compat=1.1 only)
  refcount_bits=N        refcount width, a power of two from 1 to 64
                         (other than 16 needs compat=1.1); rebuilds the
                         refcount structures
  size=SIZE              virtual size (a shrink is allowed, as in qemu-img)
  backing_file=NAME      rewrite the backing file name, metadata only, as
                         qemu-img rebase -u (qemu-img 7.2 amend refuses this)
  backing_fmt=FMT        rewrite the backing format (qcow2 or raw)
  help                   list these options

Key slots of an encrypted (LUKS) image, as qemu-img amend takes them; the
image is named with --image-opts and its current key, the secrets with
--object (see docs/encryption.md):

  encrypt.state=active,encrypt.new-secret=ID[,encrypt.keyslot=N][,encrypt.iter-time=MS]
                         add a key slot opening with secret ID
  encrypt.state=inactive,encrypt.old-secret=ID
                         remove every key slot secret ID opens
  encrypt.state=inactive,encrypt.keyslot=N
                         remove key slot N
  The last active key slot is never removed. Data is not rewritten.
`

var amendOptionNames = []string{"backing_file", "backing_fmt", "compat", "lazy_refcounts", "refcount_bits", "size"}

// createOnlyOptions are qcow2 creation options qemu-img names when they are
// given to amend.
var createOnlyOptions = map[string]bool{
	"cluster_size": true, "extended_l2": true, "compression_type": true,
	"preallocation": true, "encryption": true, "encrypt.format": true,
}

func runImgAmend(args []string) int {
	pa, err := parseArgs(args, argSpec{
		short: "ho:f:t:pq",
		long:  map[string]bool{"help": false, "object": true, "image-opts": false, "force": false},
	})
	if err != nil {
		return faceUsageError(err.Error())
	}
	var optList []string
	fmtName := ""
	for _, o := range pa.opts {
		switch o.name {
		case "h", "help":
			fmt.Print(amendHelp)
			return 0
		case "o":
			if !validOptionList(o.val) {
				return imgErr("Invalid option list: %s", o.val)
			}
			optList = append(optList, o.val)
		case "f":
			fmtName = o.val
		case "t":
			if !validCacheMode(o.val) {
				return imgErr("Invalid cache option: %s", o.val)
			}
		case "p", "q", "force":
		}
	}
	if len(optList) == 0 {
		return faceUsageError("Must specify options (-o)")
	}
	options := strings.Join(optList, ",")
	if fmtName != "" && fmtName != "qcow2" {
		return imgErr("Format driver '%s' does not support option amendment", fmtName)
	}
	kv, err := parseOptionList(options)
	if err != nil {
		return imgErr("%v", err)
	}
	if fmtName != "" && hasHelpOption(kv) {
		printAmendOptions()
		return 0
	}
	if len(pa.pos) != 1 {
		return imgErr("Expecting one image file name")
	}
	if hasHelpOption(kv) {
		printAmendOptions()
		return 0
	}
	ia, err := newImageArgs(pa)
	if err != nil {
		return imgErr("%v", err)
	}
	defer ia.secrets.wipe()
	kv, ks, err := splitKeyslotOptions(kv, ia.secrets)
	if err != nil {
		return imgErr("%v", err)
	}
	ao, err := parseAmendOptions(kv)
	if err != nil {
		return imgErr("%v", err)
	}
	ref, err := ia.ref(pa.pos[0], "")
	if err != nil {
		return imgErr("%v", err)
	}
	img, err := qcow2.Open(ref.path, ref.openOptions(false, false))
	if err != nil {
		return imgErr("Could not open '%s': %v", ref.path, err)
	}
	if ks != nil {
		if err := ks.apply(img); err != nil {
			img.Close()
			return imgErr("%v", keyError(err))
		}
	}
	if err := img.Amend(ao); err != nil {
		img.Close()
		return imgErr("%v", err)
	}
	if err := img.Close(); err != nil {
		return imgErr("%s: %v", pa.pos[0], err)
	}
	return 0
}

func printAmendOptions() {
	fmt.Println("Amend options for 'qcow2':")
	desc := map[string]string{
		"backing_file":   "backing_file=<str>     - File name of a base image",
		"backing_fmt":    "backing_fmt=<str>      - Image format of the base image",
		"compat":         "compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])",
		"lazy_refcounts": "lazy_refcounts=<bool (on/off)> - Postpone refcount updates",
		"refcount_bits":  "refcount_bits=<num>    - Width of a reference count entry in bits",
		"size":           "size=<size>            - Virtual disk size",
	}
	for _, n := range amendOptionNames {
		fmt.Println("  " + desc[n])
	}
}

func hasHelpOption(kv optionList) bool {
	for _, o := range kv {
		if o.name == "help" {
			return true
		}
	}
	return false
}

// validOptionList is qemu's is_valid_option_list: not empty, and no empty
// element (a trailing comma); ",," is an escaped comma.
func validOptionList(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] != ',' {
			continue
		}
		if i+1 < len(s) && s[i+1] == ',' {
			i++
			continue
		}
		if i == 0 || i == len(s)-1 || s[i+1] == ',' {
			return false
		}
	}
	return true
}

// parseAmendOptions validates the option list as qemu's qcow2 amend options
// do, in qemu's words.
func parseAmendOptions(kv optionList) (qcow2.AmendOptions, error) {
	var ao qcow2.AmendOptions
	for _, o := range kv {
		switch o.name {
		case "compat":
			switch o.val {
			case "0.10", "v2":
				ao.Compat = "0.10"
			case "1.1", "v3":
				ao.Compat = "1.1"
			default:
				return ao, fmt.Errorf("Unknown compatibility level %s", o.val)
			}
		case "lazy_refcounts":
			b, err := parseBool(o.name, o.val)
			if err != nil {
				return ao, err
			}
			ao.LazyRefcounts = &b
		case "refcount_bits":
			n, err := strconv.ParseUint(o.val, 10, 64)
			if err != nil {
				return ao, fmt.Errorf("Parameter 'refcount_bits' expects a non-negative number below 2^64")
			}
			if n == 0 || n > 64 || n&(n-1) != 0 {
				return ao, fmt.Errorf("Refcount width must be a power of two and may not exceed 64 bits")
			}
			bits := int(n)
			ao.RefcountBits = bits
		case "size":
			n, err := parseSize(o.val)
			if err != nil {
				return ao, fmt.Errorf("Parameter 'size' expects a non-negative number below 2^64\n" +
					"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
					"and exabytes, respectively.")
			}
			ao.Size = n
		case "backing_file":
			v := o.val
			ao.BackingFile = &v
		case "backing_fmt":
			v := o.val
			ao.BackingFormat = &v
		case "data_file":
			return ao, fmt.Errorf("data-file can only be set for images that use an external data file")
		case "data_file_raw":
			return ao, fmt.Errorf("data-file-raw cannot be set on existing images")
		default:
			if createOnlyOptions[o.name] || strings.HasPrefix(o.name, "encrypt.") {
				return ao, fmt.Errorf("Invalid parameter '%s'\nThis option is only supported for image creation", o.name)
			}
			return ao, fmt.Errorf("Invalid parameter '%s'", o.name)
		}
	}
	return ao, nil
}

func validCacheMode(s string) bool {
	switch s {
	case "none", "off", "writeback", "writethrough", "directsync", "unsafe":
		return true
	}
	return false
}

// Shared by the snapshot, resize and amend faces.

// faceUsageError is qemu-img's error_exit: the error, a pointer to --help,
// exit status 1.
func faceUsageError(msg string) int {
	fmt.Fprintf(os.Stderr, "qcow2-csi img: %s\nTry 'qcow2-csi img --help' for more information\n", msg)
	return 1
}

// keyslotChange is an amend of an encrypted image's key slots.
type keyslotChange struct {
	state    string // "active" or "inactive"
	newPass  []byte
	oldPass  []byte
	slot     int
	iterTime time.Duration
}

// splitKeyslotOptions takes the encrypt.* amend options out of kv.
func splitKeyslotOptions(kv optionList, secrets imgSecrets) (optionList, *keyslotChange, error) {
	var rest optionList
	var ks *keyslotChange
	for _, o := range kv {
		if !strings.HasPrefix(o.name, "encrypt.") {
			rest = append(rest, o)
			continue
		}
		if ks == nil {
			ks = &keyslotChange{slot: -1}
		}
		var err error
		switch o.name {
		case "encrypt.state":
			if o.val != "active" && o.val != "inactive" {
				return nil, nil, fmt.Errorf("Invalid parameter value '%s' for encrypt.state (active, inactive)", o.val)
			}
			ks.state = o.val
		case "encrypt.new-secret":
			ks.newPass, err = secrets.get(o.val)
		case "encrypt.old-secret":
			ks.oldPass, err = secrets.get(o.val)
		case "encrypt.keyslot":
			n, perr := strconv.Atoi(o.val)
			if perr != nil || n < 0 || n > 7 {
				return nil, nil, fmt.Errorf("Invalid keyslot %s (0 to 7)", o.val)
			}
			ks.slot = n
		case "encrypt.iter-time":
			ks.iterTime, err = parseMillis(o.name, o.val)
		default:
			return nil, nil, fmt.Errorf("Invalid parameter '%s'\nThis option is only supported for image creation", o.name)
		}
		if err != nil {
			return nil, nil, err
		}
	}
	if ks == nil {
		return rest, nil, nil
	}
	switch {
	case ks.state == "":
		return nil, nil, fmt.Errorf("Parameter 'encrypt.state' is required to change key slots")
	case ks.state == "active" && ks.newPass == nil:
		return nil, nil, fmt.Errorf("'new-secret' is required to activate a keyslot")
	case ks.state == "active" && ks.oldPass != nil:
		return nil, nil, fmt.Errorf("'old-secret' must not be given when activating keyslots")
	case ks.state == "inactive" && ks.newPass != nil:
		return nil, nil, fmt.Errorf("'new-secret' must not be given when erasing keyslots")
	case ks.state == "inactive" && (ks.oldPass == nil) == (ks.slot < 0):
		return nil, nil, fmt.Errorf("exactly one of 'old-secret' and 'keyslot' is needed to erase keyslots")
	}
	return rest, ks, nil
}

func (ks *keyslotChange) apply(img *qcow2.Image) error {
	if !img.Encrypted() {
		return fmt.Errorf("the image is not encrypted: encrypt.* options cannot be amended")
	}
	if ks.state == "active" {
		_, err := img.AddKeySlot(ks.newPass, qcow2.KeySlotOptions{Slot: ks.slot, IterTime: ks.iterTime})
		return err
	}
	_, err := img.RemoveKeySlots(ks.oldPass, ks.slot)
	return err
}
