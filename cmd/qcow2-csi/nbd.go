package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/nbd"
)

func init() {
	registerCommand(command{name: "nbd", short: "serve an image over NBD (qemu-nbd work-alike)", run: runNBD})
}

const nbdUsage = `Usage: qcow2-csi nbd [OPTIONS] FILE

Serve FILE (a qcow2 image or a raw file) over NBD, with qemu-nbd 7.2's flags.
Unlike qemu-nbd it listens on a unix socket unless TCP is asked for with -b
or -p; without -k the socket is %s in a new private
directory (mode 0700) under $XDG_RUNTIME_DIR, or $TMPDIR, or /tmp; its path
is printed to stderr once it accepts clients, and both go when the server
exits.

  -k, --socket=PATH         path of the unix socket to listen on
  -b, --bind=IFACE          listen on TCP at this address (default 0.0.0.0 with -p)
  -p, --port=PORT           listen on TCP at this port (default 10809 with -b)
  -e, --shared=NUM          serve up to NUM clients at once (default 1); more
                            than one advertises NBD_FLAG_CAN_MULTI_CONN
  -t, --persistent          do not exit when the last client disconnects
  -x, --export-name=NAME    export name (default: the empty string)
  -D, --description=TEXT    export description
  -r, --read-only           export read-only
  -f, --format=FORMAT       image format: qcow2 or raw (default: probed)
  -l, --load-snapshot=NAME  export internal snapshot NAME (or ID, or
                            snapshot.id=ID,snapshot.name=NAME) read-only (qcow2)
  -B, --bitmap=NAME         expose persistent dirty bitmap NAME as the context
                            qemu:dirty-bitmap:NAME (qcow2)
  -A, --allocation-depth    expose the context qemu:allocation-depth
      --crash-consistent-bitmaps
                            keep the image's enabled persistent bitmaps correct
                            on disk at every moment (bits fsynced before the
                            data they cover), so that they survive a crash of
                            this server; not in qemu-nbd (docs/bitmaps-and-check.md)
      --discard=MODE        ignore (default, as qemu-nbd): trims are no-ops and
                            zeroing keeps space allocated; unmap: trims and
                            zeroing free space
      --object=secret,id=ID,file=PATH
                            define a secret (also data=..., format=base64), as
                            qemu-nbd; repeatable
      --image-opts          FILE is an option list, as qemu-nbd:
                            driver=qcow2,file.filename=PATH,encrypt.key-secret=ID
                            serves an encrypted (LUKS) image with its key
      --pid-file=PATH       write the server's process ID to PATH
  -v, --verbose             log connections to stderr
  -h, --help                show this help
`

// nbdOptions are the parsed flags of `qcow2-csi nbd`.
type nbdOptions struct {
	socket, bind, port    string
	shared                int
	persistent            bool
	exportName, desc      string
	readOnly              bool
	format                string
	snapshot, bitmap      string
	allocationDepth       bool
	crashConsistent       bool
	pidFile               string
	discard               string
	verbose               bool
	file                  string
	bindGiven, portGiven  bool
	socketGiven, exitHelp bool
	objects               stringList
	imageOpts             bool
	passphrase            []byte // from --image-opts encrypt.key-secret
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return fmt.Sprint(*l) }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func parseNBDFlags(args []string, stderr io.Writer) (*nbdOptions, error) {
	o := &nbdOptions{shared: 1}
	fs := flag.NewFlagSet("qcow2-csi nbd", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	str := func(p *string, def string, names ...string) {
		for _, n := range names {
			fs.StringVar(p, n, def, "")
		}
	}
	boolean := func(p *bool, names ...string) {
		for _, n := range names {
			fs.BoolVar(p, n, false, "")
		}
	}
	str(&o.socket, "", "k", "socket")
	str(&o.bind, "", "b", "bind")
	str(&o.port, "", "p", "port")
	fs.IntVar(&o.shared, "e", 1, "")
	fs.IntVar(&o.shared, "shared", 1, "")
	boolean(&o.persistent, "t", "persistent")
	str(&o.exportName, "", "x", "export-name")
	str(&o.desc, "", "D", "description")
	boolean(&o.readOnly, "r", "read-only")
	str(&o.format, "", "f", "format")
	str(&o.snapshot, "", "l", "load-snapshot")
	str(&o.bitmap, "", "B", "bitmap")
	boolean(&o.allocationDepth, "A", "allocation-depth")
	boolean(&o.crashConsistent, "crash-consistent-bitmaps")
	str(&o.pidFile, "", "pid-file")
	fs.Var(&o.objects, "object", "")
	boolean(&o.imageOpts, "image-opts")
	str(&o.discard, "ignore", "discard")
	boolean(&o.verbose, "v", "verbose")
	boolean(&o.exitHelp, "h", "help")

	// getopt permutes: flags may follow FILE.
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if o.exitHelp {
		return o, nil
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "b", "bind":
			o.bindGiven = true
		case "p", "port":
			o.portGiven = true
		case "k", "socket":
			o.socketGiven = true
		}
	})
	if len(pos) != 1 {
		return nil, fmt.Errorf("expected one FILE argument, got %d", len(pos))
	}
	o.file = pos[0]
	secrets, err := parseObjects(o.objects)
	if err != nil {
		return nil, err
	}
	ref, err := resolveImage(o.file, o.format, o.imageOpts, secrets)
	if err != nil {
		return nil, err
	}
	o.file, o.format, o.passphrase = ref.path, ref.format, ref.passphrase
	if o.socketGiven && (o.bindGiven || o.portGiven) {
		return nil, errors.New("-k and -b/-p are exclusive: listen on a unix socket or on TCP")
	}
	if o.shared < 1 {
		return nil, fmt.Errorf("invalid shared device number %d", o.shared)
	}
	switch o.format {
	case "", "raw", "qcow2":
	default:
		return nil, fmt.Errorf("unsupported format %q (raw or qcow2)", o.format)
	}
	switch o.discard {
	case "ignore", "off", "unmap", "on":
	default:
		return nil, fmt.Errorf("invalid discard mode %q (ignore or unmap)", o.discard)
	}
	if o.portGiven {
		if p, err := strconv.Atoi(o.port); err != nil || p < 0 || p > 65535 {
			return nil, fmt.Errorf("invalid port %q", o.port)
		}
	}
	if len(o.exportName) > 4096 || len(o.desc) > 4096 {
		return nil, errors.New("export name and description must be at most 4096 bytes")
	}
	return o, nil
}

// defaultSocketName is the socket's name in the private directory that
// `qcow2-csi nbd FILE` makes without -k. Not the image's name: a long one
// would overflow the 108 bytes a socket path may have.
const defaultSocketName = "nbd.sock"

// privateSocketDir makes the directory the socket goes in without -k: new
// and 0700 (os.MkdirTemp), so that no other user can have put anything at
// the socket's path first, or connect to it.
func privateSocketDir() (string, error) {
	base := os.Getenv("XDG_RUNTIME_DIR")
	if base == "" {
		base = os.TempDir()
	}
	return os.MkdirTemp(base, "qcow2-csi-nbd-")
}

func runNBD(args []string) int {
	o, err := parseNBDFlags(args, os.Stderr)
	if err != nil || o.exitHelp {
		fmt.Fprintf(os.Stderr, nbdUsage, defaultSocketName)
		if err != nil {
			fmt.Fprintf(os.Stderr, "\nqcow2-csi nbd: %v\n", err)
			return 1
		}
		return 0
	}
	if err := serveNBD(o); err != nil {
		fmt.Fprintf(os.Stderr, "qcow2-csi nbd: %v\n", err)
		return 1
	}
	return 0
}

func serveNBD(o *nbdOptions) error {
	// Signals are caught from the start, so one that arrives as soon as the
	// socket exists still shuts down cleanly (flush, socket removed).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	format := o.format
	if format == "" {
		var err error
		if format, err = probeFormat(o.file); err != nil {
			return err
		}
	}
	readOnly := o.readOnly || o.snapshot != ""
	backend, closeBackend, err := openNBDBackend(o, format, readOnly)
	if err != nil {
		return err
	}
	defer closeBackend()

	exp := &nbd.Export{
		Name:        o.exportName,
		Description: o.desc,
		Backend:     backend,
		ReadOnly:    readOnly,
		MultiConn:   o.shared > 1,
		NoUnmap:     o.discard == "ignore" || o.discard == "off",
	}
	var log *slog.Logger
	if o.verbose {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	srv, err := nbd.NewServer(nbd.ServerOptions{
		Logger:         log,
		MaxConnections: o.shared,
		StopWhenIdle:   !o.persistent,
	}, exp)
	if err != nil {
		return err
	}

	var ln net.Listener
	if o.bindGiven || o.portGiven {
		host, port := o.bind, o.port
		if !o.bindGiven {
			host = "0.0.0.0"
		}
		if !o.portGiven {
			port = "10809"
		}
		ln, err = net.Listen("tcp", net.JoinHostPort(host, port))
	} else {
		path := o.socket
		if !o.socketGiven {
			dir, derr := privateSocketDir()
			if derr != nil {
				return fmt.Errorf("making a private directory for the socket: %w", derr)
			}
			// Runs after the listener has closed (and unlinked the socket).
			defer os.Remove(dir)
			path = filepath.Join(dir, defaultSocketName)
		}
		ln, err = net.Listen("unix", path)
		if ul, ok := ln.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(true)
		}
		// Said only once the socket accepts: a client that waits for this
		// line may connect at once.
		if err == nil && !o.socketGiven {
			fmt.Fprintf(os.Stderr, "qcow2-csi nbd: serving %s on unix socket %s\n", o.file, path)
		}
	}
	if err != nil {
		return err
	}
	if o.pidFile != "" {
		if err := os.WriteFile(o.pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			ln.Close()
			return err
		}
		defer os.Remove(o.pidFile)
	}

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(context.Background(), ln) }()
	select {
	case err = <-errc:
	case <-ctx.Done():
		ln.Close()
		err = nil
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if serr := srv.Shutdown(sctx); err == nil && serr != nil {
		err = serr
	}
	if ferr := backend.Flush(context.Background()); err == nil && ferr != nil && !readOnly {
		err = ferr
	}
	return err
}
