package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// `img amend`: qemu-img 7.2's amend sub-command for qcow2: compat,
// lazy_refcounts, refcount_bits, size, and (beyond qemu-img 7.2, which sends
// users to `rebase -u` for it) backing_file/backing_fmt as a metadata-only
// change.

func init() {
	registerImgCommand(imgCommand{
		name:  "amend",
		usage: "amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename",
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
`

var amendOptionNames = []string{"backing_file", "backing_fmt", "compat", "lazy_refcounts", "refcount_bits", "size"}

// createOnlyOptions are qcow2 creation options qemu-img names when they are
// given to amend.
var createOnlyOptions = map[string]bool{
	"cluster_size": true, "extended_l2": true, "compression_type": true,
	"preallocation": true, "encryption": true, "encrypt.format": true,
}

func runImgAmend(args []string) int {
	spec := faceGetopt{
		short: "ho:f:t:pq",
		long:  map[string]bool{"help": false, "object": true, "image-opts": false, "force": false},
		alias: map[string]string{"help": "h"},
	}
	opts, rest, err := spec.parse(args)
	if err != nil {
		return faceUsageError(err.Error())
	}
	var optList []string
	fmtName := ""
	for _, o := range opts {
		switch o.name {
		case "h":
			fmt.Print(amendHelp)
			return 0
		case "o":
			if !validOptionList(o.val) {
				return faceError("Invalid option list: %s", o.val)
			}
			optList = append(optList, o.val)
		case "f":
			fmtName = o.val
		case "t":
			if !validCacheMode(o.val) {
				return faceError("Invalid cache option: %s", o.val)
			}
		case "p", "q", "force":
		case "object", "image-opts":
			return faceError("option --%s is not supported", o.name)
		}
	}
	if len(optList) == 0 {
		return faceUsageError("Must specify options (-o)")
	}
	options := strings.Join(optList, ",")
	if fmtName != "" && fmtName != "qcow2" {
		return faceError("Format driver '%s' does not support option amendment", fmtName)
	}
	kv, err := splitOptionList(options)
	if err != nil {
		return faceError("%v", err)
	}
	if fmtName != "" && hasHelpOption(kv) {
		printAmendOptions()
		return 0
	}
	if len(rest) != 1 {
		return faceError("Expecting one image file name")
	}
	if hasHelpOption(kv) {
		printAmendOptions()
		return 0
	}
	ao, err := parseAmendOptions(kv)
	if err != nil {
		return faceError("%v", err)
	}
	img, err := qcow2.Open(rest[0], qcow2.OpenOptions{})
	if err != nil {
		return faceError("Could not open '%s': %v", rest[0], err)
	}
	if err := img.Amend(ao); err != nil {
		img.Close()
		return faceError("%v", err)
	}
	if err := img.Close(); err != nil {
		return faceError("%s: %v", rest[0], err)
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

type optKV struct{ key, val string }

func hasHelpOption(kv []optKV) bool {
	for _, o := range kv {
		if o.key == "help" || o.key == "?" {
			return true
		}
	}
	return false
}

// validOptionList is qemu's is_valid_option_list: not empty, and no empty
// element (a trailing comma), ",," being an escaped comma.
func validOptionList(s string) bool {
	if s == "" {
		return false
	}
	kv, err := splitOptionList(s)
	return err == nil && len(kv) > 0
}

// splitOptionList splits qemu's "a=b,c=d" syntax; ",," is a literal comma in
// a value. A bare key (no '=') is kept with an empty value ("help").
func splitOptionList(s string) ([]optKV, error) {
	var out []optKV
	var cur strings.Builder
	var parts []string
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	parts = append(parts, cur.String())
	for _, p := range parts {
		if p == "" {
			return nil, fmt.Errorf("Invalid option list: %s", s)
		}
		k, v, _ := strings.Cut(p, "=")
		out = append(out, optKV{k, v})
	}
	return out, nil
}

// parseAmendOptions validates the option list as qemu's qcow2 amend options
// do, in qemu's words.
func parseAmendOptions(kv []optKV) (qcow2.AmendOptions, error) {
	var ao qcow2.AmendOptions
	for _, o := range kv {
		switch o.key {
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
			b, ok := parseQemuBool(o.val)
			if !ok {
				return ao, fmt.Errorf("Parameter 'lazy_refcounts' expects 'on' or 'off'")
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
			n, err := parseQemuSize(o.val)
			if err != nil || n > 1<<63-1 {
				return ao, fmt.Errorf("Parameter 'size' expects a non-negative number below 2^64\n" +
					"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
					"and exabytes, respectively.")
			}
			ao.Size = int64(n)
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
			if createOnlyOptions[o.key] || strings.HasPrefix(o.key, "encrypt.") {
				return ao, fmt.Errorf("Invalid parameter '%s'\nThis option is only supported for image creation", o.key)
			}
			return ao, fmt.Errorf("Invalid parameter '%s'", o.key)
		}
	}
	return ao, nil
}

// parseQemuBool accepts what qemu's option parser accepts for a bool.
func parseQemuBool(s string) (bool, bool) {
	switch s {
	case "on", "yes", "true", "y":
		return true, true
	case "off", "no", "false", "n":
		return false, true
	}
	return false, false
}

func validCacheMode(s string) bool {
	switch s {
	case "none", "off", "writeback", "writethrough", "directsync", "unsafe":
		return true
	}
	return false
}

// ---- helpers shared by the snapshot, resize and amend faces ----

// faceError prints a qemu-img style error and returns exit status 1.
func faceError(format string, args ...any) int {
	fmt.Fprintf(os.Stderr, "qcow2-csi img: "+format+"\n", args...)
	return 1
}

// faceUsageError is qemu-img's error_exit: the error, a pointer to --help,
// exit status 1.
func faceUsageError(msg string) int {
	fmt.Fprintf(os.Stderr, "qcow2-csi img: %s\nTry 'qcow2-csi img --help' for more information\n", msg)
	return 1
}

// faceGetopt parses arguments the way glibc getopt_long does for qemu-img:
// options and operands may be interleaved, "--" ends options, short options
// cluster ("-lq"), an option argument may be attached ("-cNAME") or the next
// word, and a long option may be abbreviated to any unique prefix.
type faceGetopt struct {
	short string            // getopt short-option string; ':' after a letter = takes an argument
	long  map[string]bool   // long option name -> takes an argument
	alias map[string]string // long name reported as a short one ("help" -> "h")
}

type faceOpt struct{ name, val string }

func (g faceGetopt) parse(args []string) (opts []faceOpt, operands []string, err error) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			operands = append(operands, args[i+1:]...)
			return opts, operands, nil
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			full, err := g.matchLong(name, a)
			if err != nil {
				return nil, nil, err
			}
			if g.long[full] {
				if !hasVal {
					if i+1 >= len(args) {
						return nil, nil, fmt.Errorf("missing argument for option '%s'", a)
					}
					i++
					val = args[i]
				}
			} else if hasVal {
				return nil, nil, fmt.Errorf("option '--%s' doesn't allow an argument", full)
			}
			if s, ok := g.alias[full]; ok {
				full = s
			}
			opts = append(opts, faceOpt{full, val})
		case len(a) > 1 && a[0] == '-':
			for j := 1; j < len(a); j++ {
				c := a[j]
				k := strings.IndexByte(g.short, c)
				if c == ':' || k < 0 {
					return nil, nil, fmt.Errorf("unrecognized option '%s'", a)
				}
				if k+1 < len(g.short) && g.short[k+1] == ':' {
					val := a[j+1:]
					if val == "" {
						if i+1 >= len(args) {
							return nil, nil, fmt.Errorf("missing argument for option '-%c'", c)
						}
						i++
						val = args[i]
					}
					opts = append(opts, faceOpt{string(c), val})
					break
				}
				opts = append(opts, faceOpt{string(c), ""})
			}
		default:
			operands = append(operands, a)
		}
	}
	return opts, operands, nil
}

func (g faceGetopt) matchLong(name, arg string) (string, error) {
	if _, ok := g.long[name]; ok {
		return name, nil
	}
	var match []string
	for l := range g.long {
		if name != "" && strings.HasPrefix(l, name) {
			match = append(match, l)
		}
	}
	switch len(match) {
	case 1:
		return match[0], nil
	case 0:
		return "", fmt.Errorf("unrecognized option '%s'", arg)
	}
	return "", fmt.Errorf("option '%s' is ambiguous", arg)
}

// parseQemuSize is qemu_strtosz with the default unit of bytes: a number
// (with an optional fraction when a unit follows), then an optional suffix
// B, K, M, G, T, P or E (either case, powers of 1024). The result must stay
// below 2^64.
func parseQemuSize(s string) (uint64, error) {
	bad := fmt.Errorf("invalid size %q", s)
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, bad
	}
	intPart, err := strconv.ParseUint(s[:i], 10, 64)
	if err != nil {
		return 0, bad
	}
	frac := 0.0
	hasFrac := false
	if i < len(s) && s[i] == '.' {
		j := i + 1
		for j < len(s) && s[j] >= '0' && s[j] <= '9' {
			j++
		}
		if j == i+1 {
			return 0, bad
		}
		frac, _ = strconv.ParseFloat("0"+s[i:j], 64)
		hasFrac = true
		i = j
	}
	mul := uint64(1)
	if i < len(s) {
		switch s[i] {
		case 'b', 'B':
			mul = 1
		case 'k', 'K':
			mul = 1 << 10
		case 'm', 'M':
			mul = 1 << 20
		case 'g', 'G':
			mul = 1 << 30
		case 't', 'T':
			mul = 1 << 40
		case 'p', 'P':
			mul = 1 << 50
		case 'e', 'E':
			mul = 1 << 60
		default:
			return 0, bad
		}
		i++
	}
	if i != len(s) {
		return 0, bad
	}
	if hasFrac && mul == 1 {
		return 0, bad
	}
	if intPart > (1<<64-1)/mul {
		return 0, bad
	}
	v := intPart * mul
	f := uint64(frac * float64(mul))
	if v+f < v {
		return 0, bad
	}
	return v + f, nil
}
