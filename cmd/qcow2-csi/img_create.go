package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"golang.org/x/sys/unix"
)

func init() {
	registerImgCommand(imgCommand{
		name:  "create",
		usage: "create [--object objectdef] [-q] [-f fmt] [-b backing_file -F backing_fmt] [-u] [-o options] filename [size]",
		run:   runImgCreate,
	})
}

const createOptionsHelp = `Supported options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size (512 to 2M, default 64k)
  compat=<str>           - Compatibility level (v2 / 0.10, v3 / 1.1)
  compression_type=<str> - Compression method used for image cluster compression (zlib, zstd)
  encrypt.format=<str>   - Encrypt the image, format choices: 'luks'
  encrypt.key-secret=<str> - ID of secret providing qcow2 AES key or LUKS passphrase
  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm (aes-256, aes-128)
  encrypt.cipher-mode=<str> - Name of encryption cipher mode (xts)
  encrypt.ivgen-alg=<str> - Name of IV generator algorithm (plain64)
  encrypt.hash-alg=<str> - Name of encryption hash algorithm (sha256, sha1, sha512)
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
`

// createSettings is what -o and the flags say, with what was set
// explicitly (qemu-img prints those in its "Formatting" line).
type createSettings struct {
	opts qcow2.CreateOptions
	set  map[string]bool
	help bool
	// secrets are the --object secrets encrypt.key-secret may name;
	// encrypt lists the encrypt.* options as given (for the
	// Formatting line).
	secrets imgSecrets
	encrypt []string
}

// imgFileMode is the mode img create and img convert give a new file,
// before the umask: qemu-img's (0644), so that the img face stays a drop-in
// for it. The driver's pool files are 0600 (the qcow2 library's default),
// and the pool directory is 0700, which covers a file an operator makes
// there with this tool.
const imgFileMode = 0o644

func newCreateSettings() *createSettings {
	return &createSettings{opts: qcow2.CreateOptions{Mode: imgFileMode}, set: map[string]bool{}}
}

func applyCreateOptions(cs *createSettings, list string) error {
	items, err := parseOptionList(list)
	if err != nil {
		return err
	}
	o := &cs.opts
	for _, it := range items {
		k, v := it.name, it.val
		cs.set[k] = true
		switch k {
		case "help":
			cs.help = true
		case "size":
			n, err := parseSize(v)
			if err != nil {
				return fmt.Errorf("Parameter 'size' expects a non-negative number below 2^64")
			}
			o.Size = n
		case "cluster_size":
			n, err := parseSize(v)
			if err != nil {
				return fmt.Errorf("Parameter 'cluster_size' expects a size")
			}
			o.ClusterSize = n
		case "compat":
			switch v {
			case "0.10", "v2":
				o.Version = 2
			case "1.1", "v3":
				o.Version = 3
			default:
				return fmt.Errorf("Invalid compatibility level: '%s'", v)
			}
		case "refcount_bits":
			var n int
			if _, err := fmt.Sscan(v, &n); err != nil {
				return fmt.Errorf("Parameter 'refcount_bits' expects a number")
			}
			o.RefcountBits = n
		case "lazy_refcounts":
			if o.LazyRefcounts, err = parseBool(k, v); err != nil {
				return err
			}
		case "extended_l2":
			if o.ExtendedL2, err = parseBool(k, v); err != nil {
				return err
			}
		case "compression_type":
			o.CompressionType = v
		case "preallocation":
			o.Preallocation = v
		case "backing_file":
			o.BackingFile = v
		case "backing_fmt":
			o.BackingFormat = v
		case "encryption", "data_file", "data_file_raw":
			return fmt.Errorf("option '%s' is not supported by qcow2-csi", k)
		default:
			if !strings.HasPrefix(k, "encrypt.") {
				return fmt.Errorf("Invalid parameter '%s'", k)
			}
			if err := applyEncryptOption(o, k, v, cs.secrets); err != nil {
				return err
			}
			cs.encrypt = append(cs.encrypt, k+"="+v)
		}
	}
	return nil
}

func runImgCreate(args []string) int {
	pa, err := parseArgs(args, argSpec{short: "F:b:f:ho:qu", long: map[string]bool{"help": false, "object": true}})
	if err != nil {
		return imgErr("%v", err)
	}
	if pa.wantsHelp("create") {
		return 0
	}
	format, _ := pa.get("f")
	if format == "" {
		format = "raw"
	}
	cs := newCreateSettings()
	if cs.secrets, err = parseObjects(pa.all("object")); err != nil {
		return imgErr("%v", err)
	}
	defer cs.secrets.wipe()
	if b, ok := pa.get("b"); ok {
		cs.opts.BackingFile, cs.set["backing_file"] = b, true
	}
	if f, ok := pa.get("F"); ok {
		cs.opts.BackingFormat, cs.set["backing_fmt"] = f, true
	}
	for _, o := range pa.all("o") {
		if err := applyCreateOptions(cs, o); err != nil {
			return imgErr("%v", err)
		}
	}
	if cs.help {
		fmt.Print(createOptionsHelp)
		return 0
	}
	if err := checkEncryption(&cs.opts); err != nil {
		return imgErr("%v", err)
	}
	if cs.opts.Encryption != nil && format != "qcow2" {
		return imgErr("Invalid parameter 'encrypt.format'")
	}
	if len(pa.pos) < 1 || len(pa.pos) > 2 {
		return imgErr("Expecting image file name")
	}
	path := pa.pos[0]
	if len(pa.pos) == 2 {
		n, err := parseSize(pa.pos[1])
		if err != nil {
			return imgErr("Invalid image size specified. You may use k, M, G, T, P or E suffixes for")
		}
		cs.opts.Size = n
		cs.set["size"] = true
	}
	o := &cs.opts
	if o.BackingFile != "" {
		full := qcow2.CombineBackingPath(path, o.BackingFile)
		if o.BackingFormat == "" {
			detected, perr := probeFormat(full)
			if perr == nil {
				return imgErr("%s: Backing file specified without backing format\nDetected format of %s.", path, detected)
			}
			return imgErr("%s: Backing file specified without backing format", path)
		}
		if !cs.set["size"] && !pa.has("u") {
			b, err := openImg(full, o.BackingFormat, false, true)
			if err != nil {
				return imgErr("%s: %v", path, err)
			}
			o.Size = b.Size()
			b.Close()
		}
	} else if !cs.set["size"] {
		return imgErr("%s: Image creation needs a size parameter", path)
	}
	if !pa.has("q") {
		fmt.Println(formattingLine(path, format, cs))
	}
	switch format {
	case "qcow2":
		img, err := qcow2.Create(path, *o)
		if err != nil {
			return imgErr("%s: %v", path, trimQcow2(err))
		}
		if err := img.Close(); err != nil {
			return imgErr("%s: %v", path, err)
		}
	case "raw":
		if err := createRaw(path, o.Size, o.Preallocation); err != nil {
			return imgErr("%s: %v", path, err)
		}
	default:
		return imgErr("Unknown file format '%s' (supported: qcow2, raw)", format)
	}
	return 0
}

// formattingLine mirrors qemu-img's "Formatting ..." line.
func formattingLine(path, format string, cs *createSettings) string {
	o := cs.opts
	var b strings.Builder
	fmt.Fprintf(&b, "Formatting '%s', fmt=%s", path, format)
	if format == "raw" {
		if cs.set["preallocation"] {
			fmt.Fprintf(&b, " preallocation=%s", o.Preallocation)
		}
		fmt.Fprintf(&b, " size=%d", o.Size)
		return b.String()
	}
	clusterSize := o.ClusterSize
	if clusterSize == 0 {
		clusterSize = 65536
	}
	onOff := func(v bool) string {
		if v {
			return "on"
		}
		return "off"
	}
	for _, e := range cs.encrypt {
		fmt.Fprintf(&b, " %s", e)
	}
	fmt.Fprintf(&b, " cluster_size=%d extended_l2=%s", clusterSize, onOff(o.ExtendedL2))
	if cs.set["preallocation"] {
		fmt.Fprintf(&b, " preallocation=%s", o.Preallocation)
	}
	ct := o.CompressionType
	if ct == "" {
		ct = "zlib"
	}
	fmt.Fprintf(&b, " compression_type=%s size=%d", ct, o.Size)
	if o.BackingFile != "" {
		fmt.Fprintf(&b, " backing_file=%s", o.BackingFile)
	}
	if o.BackingFormat != "" {
		fmt.Fprintf(&b, " backing_fmt=%s", o.BackingFormat)
	}
	if cs.set["compat"] {
		c := "1.1"
		if o.Version == 2 {
			c = "0.10"
		}
		fmt.Fprintf(&b, " compat=%s", c)
	}
	rb := o.RefcountBits
	if rb == 0 {
		rb = 16
	}
	fmt.Fprintf(&b, " lazy_refcounts=%s refcount_bits=%d", onOff(o.LazyRefcounts), rb)
	return b.String()
}

func createRaw(path string, size int64, prealloc string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, imgFileMode)
	if err != nil {
		return err
	}
	defer f.Close()
	switch prealloc {
	case "", "off":
		err = f.Truncate(size)
	case "falloc":
		err = unix.Fallocate(int(f.Fd()), 0, 0, size)
	case "full":
		zero := make([]byte, 1<<20)
		for off := int64(0); off < size && err == nil; off += int64(len(zero)) {
			_, err = f.WriteAt(zero[:min(int64(len(zero)), size-off)], off)
		}
	default:
		return fmt.Errorf("Invalid preallocation mode: '%s'", prealloc)
	}
	if err != nil {
		return err
	}
	return f.Sync()
}

// trimQcow2 drops the package prefix so messages read like qemu-img's.
func trimQcow2(err error) string {
	s := err.Error()
	s = strings.TrimPrefix(s, "qcow2: invalid option: ")
	s = strings.TrimPrefix(s, "qcow2: ")
	if s != "" {
		s = strings.ToUpper(s[:1]) + s[1:]
	}
	return s
}
