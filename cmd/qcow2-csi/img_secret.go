package main

import (
	"encoding/base64"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Secrets and --image-opts, as qemu-img takes them for encrypted images:
//
//	--object secret,id=sec0,file=/path/to/passphrase[,format=raw|base64]
//	--object secret,id=sec0,data=passphrase      (visible in ps: tests only)
//	--image-opts driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=sec0
//	create/convert -O qcow2: -o encrypt.format=luks,encrypt.key-secret=sec0
//
// A file secret is used byte for byte, as qemu does (a trailing newline is
// part of the passphrase).

// imgSecrets maps secret ids to their bytes.
type imgSecrets map[string][]byte

// parseObjects reads every --object. Only secret objects exist here.
func parseObjects(defs []string) (imgSecrets, error) {
	s := imgSecrets{}
	for _, d := range defs {
		// qemu's first element is the object type, bare or as qom-type=.
		typ, rest, _ := strings.Cut(d, ",")
		if typ != "secret" && typ != "qom-type=secret" {
			return nil, fmt.Errorf("Invalid object '%s': only 'secret' objects are supported", typ)
		}
		kv, err := parseOptionList(rest)
		if err != nil {
			return nil, err
		}
		var id, data, file, format string
		hasData, hasFile := false, false
		for _, o := range kv {
			switch o.name {
			case "id":
				id = o.val
			case "data":
				data, hasData = o.val, true
			case "file":
				file, hasFile = o.val, true
			case "format":
				format = o.val
			default:
				return nil, fmt.Errorf("Invalid parameter '%s' for a secret object", o.name)
			}
		}
		if id == "" {
			return nil, fmt.Errorf("Parameter 'id' is missing")
		}
		if hasData == hasFile {
			return nil, fmt.Errorf("secret '%s': exactly one of 'data' and 'file' must be given", id)
		}
		b := []byte(data)
		if hasFile {
			if b, err = os.ReadFile(file); err != nil {
				return nil, fmt.Errorf("Unable to read %s: %v", file, unwrapPathErr(err))
			}
		}
		switch format {
		case "", "raw":
		case "base64":
			d, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
			clear(b)
			if err != nil {
				return nil, fmt.Errorf("secret '%s': invalid base64 data", id)
			}
			b = d
		default:
			return nil, fmt.Errorf("secret '%s': format '%s' is not raw or base64", id, format)
		}
		if _, dup := s[id]; dup {
			return nil, fmt.Errorf("attempt to add duplicate property '%s'", id)
		}
		s[id] = b
	}
	return s, nil
}

// get returns secret id, with qemu's words when it is missing.
func (s imgSecrets) get(id string) ([]byte, error) {
	b, ok := s[id]
	if !ok {
		return nil, fmt.Errorf("No secret with id '%s'", id)
	}
	return b, nil
}

// wipe zeroes every secret (the Go strings qemu-style data= went through
// are beyond reach).
func (s imgSecrets) wipe() {
	for _, b := range s {
		clear(b)
	}
}

// imageRef is one image argument: a file name, or with --image-opts an
// option list naming the driver, the file and the key secret.
type imageRef struct {
	path, format string
	passphrase   []byte
}

// resolveImage turns a positional image argument into an imageRef. format
// is -f (ignored with --image-opts, whose driver= says it).
func resolveImage(arg, format string, imageOpts bool, secrets imgSecrets) (imageRef, error) {
	if !imageOpts {
		return imageRef{path: arg, format: format}, nil
	}
	kv, err := parseOptionList(arg)
	if err != nil {
		return imageRef{}, err
	}
	r := imageRef{}
	for _, o := range kv {
		switch o.name {
		case "driver":
			r.format = o.val
		case "file.filename", "file":
			r.path = o.val
		case "file.driver":
			if o.val != "file" {
				return imageRef{}, fmt.Errorf("Unsupported protocol driver '%s' (file)", o.val)
			}
		case "encrypt.key-secret":
			if r.passphrase, err = secrets.get(o.val); err != nil {
				return imageRef{}, err
			}
		case "encrypt.format":
			if o.val != "luks" {
				return imageRef{}, fmt.Errorf("encrypt.format '%s' is not supported (luks)", o.val)
			}
		default:
			return imageRef{}, fmt.Errorf("Invalid parameter '%s' in --image-opts", o.name)
		}
	}
	if r.path == "" {
		return imageRef{}, fmt.Errorf("A block device must be specified for \"file\"")
	}
	return r, nil
}

// openOptions are the library options for this image.
func (r imageRef) openOptions(readOnly, noLock bool) qcow2.OpenOptions {
	return qcow2.OpenOptions{ReadOnly: readOnly, NoLock: noLock, Passphrase: r.passphrase}
}

// keyError rewrites the library's "no key" error in qemu-img's words.
func keyError(err error) error {
	if err == qcow2.ErrKeyRequired {
		return fmt.Errorf("Parameter 'encrypt.key-secret' is required for cipher (use --object secret,... and --image-opts ...,encrypt.key-secret=ID)")
	}
	return err
}

// applyEncryptOption handles one encrypt.* creation option (create and
// convert -O qcow2).
func applyEncryptOption(o *qcow2.CreateOptions, k, v string, secrets imgSecrets) error {
	if o.Encryption == nil {
		o.Encryption = &qcow2.EncryptionOptions{}
	}
	e := o.Encryption
	switch k {
	case "encrypt.format":
		if v != "luks" {
			return fmt.Errorf("encrypt.format '%s' is not supported by qcow2-csi (luks)", v)
		}
		e.Format = v
	case "encrypt.key-secret":
		b, err := secrets.get(v)
		if err != nil {
			return err
		}
		e.Passphrase = b
	case "encrypt.cipher-alg":
		e.CipherAlg = v
	case "encrypt.cipher-mode":
		if v != "xts" {
			return fmt.Errorf("encrypt.cipher-mode '%s' is not supported (xts)", v)
		}
	case "encrypt.ivgen-alg":
		if v != "plain64" {
			return fmt.Errorf("encrypt.ivgen-alg '%s' is not supported (plain64)", v)
		}
	case "encrypt.hash-alg":
		e.HashAlg = v
	case "encrypt.iter-time":
		ms, err := parseMillis(k, v)
		if err != nil {
			return err
		}
		e.IterTime = ms
	default:
		return fmt.Errorf("Invalid parameter '%s'", k)
	}
	return nil
}

func parseMillis(k, v string) (time.Duration, error) {
	var n int64
	if _, err := fmt.Sscan(v, &n); err != nil || n <= 0 {
		return 0, fmt.Errorf("Parameter '%s' expects a positive number of milliseconds", k)
	}
	return time.Duration(n) * time.Millisecond, nil
}

// checkEncryption completes encrypt.* creation options: the format is
// needed once any is given, and a key.
func checkEncryption(o *qcow2.CreateOptions) error {
	e := o.Encryption
	if e == nil {
		return nil
	}
	if e.Format == "" {
		return fmt.Errorf("encrypt.format=luks is needed with the other encrypt.* options")
	}
	if e.Passphrase == nil {
		return fmt.Errorf("Parameter 'encrypt.key-secret' is required for cipher")
	}
	return nil
}

// imageArgs is what every sub-command that names images takes for
// encryption: the --object secrets and whether --image-opts is given.
type imageArgs struct {
	secrets   imgSecrets
	imageOpts bool
}

func newImageArgs(pa *parsedArgs) (*imageArgs, error) {
	s, err := parseObjects(pa.all("object"))
	if err != nil {
		return nil, err
	}
	return &imageArgs{secrets: s, imageOpts: pa.has("image-opts")}, nil
}

// ref resolves a positional image argument.
func (a *imageArgs) ref(arg, format string) (imageRef, error) {
	return resolveImage(arg, format, a.imageOpts, a.secrets)
}

// imageFromArgs resolves the image argument arg of a command that takes
// --object and --image-opts; wipe forgets the secrets once the image is
// open.
func imageFromArgs(pa *parsedArgs, arg, format string) (imageRef, func(), error) {
	ia, err := newImageArgs(pa)
	if err != nil {
		return imageRef{}, nil, err
	}
	ref, err := ia.ref(arg, format)
	if err != nil {
		ia.secrets.wipe()
		return imageRef{}, nil, err
	}
	return ref, ia.secrets.wipe, nil
}
