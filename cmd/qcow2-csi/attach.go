package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/imagebackend"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

func init() {
	registerCommand(command{name: "attach", short: "attach an image as a local block device until interrupted", run: runAttach})
}

const attachUsage = `Usage: qcow2-csi attach [OPTIONS] FILE

Attach FILE as a block device of this machine with an attach backend of the
node plugin, print the device path on stdout, and serve it until SIGINT or
SIGTERM; then detach (the device must not be in use any more) and exit. Like
'qemu-nbd -c', for operators and benchmarks. Needs root.

  --backend=NAME       attach backend: fuse (FUSE file + loop device)
  --fuse-dir=DIR       where the fuse backend mounts its filesystems
                       (default %s)
  --fuse-passthrough   let the kernel read and write a raw image's file
                       itself (FUSE passthrough, Linux 6.9+) where it
                       accepts to: faster 4k reads, much slower 4k writes
                       at high queue depth (tests/bench/attach.sh)
  --fuse-cache=MODE    how the kernel caches the device's FUSE file:
                       none (every request reaches this process),
                       writethrough (reads of cached data do not; writes
                       do before they complete) or writeback (writes too
                       wait in the kernel's cache until a flush or
                       writeback) (default %s; docs/fuse-attach.md)
  --fuse-uring         serve the FUSE requests over io_uring (Linux 6.14+,
                       module parameter fuse.enable_uring=Y) where the
                       kernel offers it, else over /dev/fuse (-v says which)
  -f, --format=FORMAT  image format: raw or qcow2 (default raw)
  --block-size=N       logical block size of the device: 512 or 4096 (default:
                       4096 when the size is a multiple of it, else 512)
  -r, --read-only      attach read-only
  --clean-stale        release the devices a dead process left in --fuse-dir
                       first (what the node plugin does at start)
  --limits=KEY=N,...   I/O limits, with the keys of a VolumeAttributesClass
                       (docs/qos.md): readIOPS, writeIOPS, readBytesPerSecond,
                       writeBytesPerSecond, each also with the suffix Burst
  -v, --verbose        log the backend's decisions to stderr
  -h, --help           show this help
`

type attachOptions struct {
	backend, fuseDir, format string
	blockSize                uint
	readOnly, cleanStale     bool
	verbose                  bool
	passthrough, uring       bool
	cache                    fuse.CacheMode
	file                     string
	limits                   throttle.Limits
}

func parseAttachFlags(args []string) (*attachOptions, error) {
	o := &attachOptions{}
	fs := flag.NewFlagSet("qcow2-csi attach", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.backend, "backend", "fuse", "")
	fs.StringVar(&o.fuseDir, "fuse-dir", fuse.DefaultDir, "")
	fs.BoolVar(&o.passthrough, "fuse-passthrough", false, "")
	fs.BoolVar(&o.uring, "fuse-uring", false, "")
	fs.StringVar(&o.format, "format", "raw", "")
	fs.StringVar(&o.format, "f", "raw", "")
	fs.UintVar(&o.blockSize, "block-size", 0, "")
	fs.BoolVar(&o.readOnly, "read-only", false, "")
	fs.BoolVar(&o.readOnly, "r", false, "")
	fs.BoolVar(&o.cleanStale, "clean-stale", false, "")
	fs.BoolVar(&o.verbose, "verbose", false, "")
	fs.BoolVar(&o.verbose, "v", false, "")
	limits := fs.String("limits", "", "")
	cache := fs.String("fuse-cache", string(fuse.DefaultCacheMode), "")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if *limits != "" {
		var err error
		if o.limits, err = throttle.ParseList(*limits); err != nil {
			return nil, fmt.Errorf("--limits: %w", err)
		}
	}
	var err error
	if o.cache, err = fuse.ParseCacheMode(*cache); err != nil {
		return nil, fmt.Errorf("--fuse-cache: %w", err)
	}
	if !o.limits.Unlimited() && o.cache != fuse.CacheNone {
		// As the node plugin refuses them (docs/qos.md).
		return nil, fmt.Errorf("--limits cannot be enforced with --fuse-cache=%s: the kernel serves cached I/O before the throttle", o.cache)
	}
	if fs.NArg() != 1 {
		return nil, errors.New("expected exactly one FILE")
	}
	o.file = fs.Arg(0)
	if o.blockSize != 0 && o.blockSize != 512 && o.blockSize != 4096 {
		return nil, fmt.Errorf("--block-size=%d: must be 512 or 4096", o.blockSize)
	}
	return o, nil
}

func runAttach(args []string) int {
	for _, a := range args {
		if a == "-h" || a == "--help" || a == "-help" {
			fmt.Printf(attachUsage, fuse.DefaultDir, fuse.DefaultCacheMode)
			return 0
		}
	}
	o, err := parseAttachFlags(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "qcow2-csi attach: %v\nRun 'qcow2-csi attach --help' for usage.\n", err)
		return 1
	}
	if err := attach(o); err != nil {
		fmt.Fprintf(os.Stderr, "qcow2-csi attach: %v\n", err)
		return 1
	}
	return 0
}

func attach(o *attachOptions) error {
	var logger *slog.Logger
	if o.verbose {
		logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	var a nbdattach.Attacher
	switch o.backend {
	case "fuse":
		a = fuse.NewAttacher(fuse.Options{Dir: o.fuseDir, Logger: logger, Passthrough: o.passthrough, Cache: o.cache, Uring: o.uring})
	default:
		return fmt.Errorf("--backend=%s: this command knows the fuse backend only", o.backend)
	}
	if err := a.Available(); err != nil {
		return err
	}
	if o.cleanStale {
		if c, ok := a.(nbdattach.StaleCleaner); ok {
			found, err := c.CleanStale(context.Background())
			for _, d := range found {
				fmt.Fprintf(os.Stderr, "qcow2-csi attach: released stale %s device %q (%s)\n", a.Name(), d.ID, d.Path)
			}
			if err != nil {
				return err
			}
		}
	}
	var b nbdattach.Backend
	var closeImage func() error
	switch o.format {
	case "raw":
		fb, err := nbdattach.OpenFile(o.file, o.readOnly)
		if err != nil {
			return err
		}
		b, closeImage = fb, fb.Close
	case "qcow2":
		img, err := qcow2.Open(o.file, qcow2.OpenOptions{ReadOnly: o.readOnly})
		if err != nil {
			return err
		}
		ib, err := imagebackend.New(img, imagebackend.Options{})
		if err != nil {
			img.Close()
			return err
		}
		b, closeImage = ib, img.Close
	default:
		return fmt.Errorf("--format=%s: raw or qcow2", o.format)
	}
	defer closeImage()
	// As the node plugin does: every device is served through a throttle,
	// which an unlimited device passes at the cost of one atomic load.
	b, th := throttle.Wrap(b)
	if err := th.Set(o.limits); err != nil {
		return fmt.Errorf("--limits: %w", err)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	dev, err := a.Attach(ctx, attachID(o.file), b, nbdattach.AttachOptions{ReadOnly: o.readOnly, BlockSize: uint32(o.blockSize)})
	cancel()
	if err != nil {
		return err
	}
	fmt.Println(dev.Path())
	for {
		<-sig
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err := dev.Detach(ctx)
		cancel()
		if err == nil {
			return closeImage()
		}
		if !errors.Is(err, nbdattach.ErrDeviceBusy) {
			return err
		}
		// Exiting now would fail the I/O of whoever uses the device.
		fmt.Fprintf(os.Stderr, "qcow2-csi attach: %v; still serving: unmount it and signal again\n", err)
	}
}

// attachID names the device after the file, in the characters the backend
// accepts, plus the process ID so that two attaches of same-named files do
// not collide.
func attachID(file string) string {
	base := []byte(file)
	for i := len(base) - 1; i >= 0; i-- {
		if base[i] == '/' {
			base = base[i+1:]
			break
		}
	}
	for i, c := range base {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			base[i] = '_'
		}
	}
	if len(base) > 100 {
		base = base[:100]
	}
	return fmt.Sprintf("%s-%d", base, os.Getpid())
}
