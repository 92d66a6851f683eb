package drivertest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// LoopAttacher attaches RawImages backends as loop devices with losetup(8).
// It implements the whole nbdattach.Attacher contract, including Reattach
// (a loop device outlives the process that set it up), so the driver's
// restart path is exercised on hosts without nbd. Backends must expose
// FilePath() (RawImage's do).
type LoopAttacher struct {
	mu sync.Mutex
	// Attached counts devices this attacher set up and has not detached,
	// for leak checks in tests.
	attached map[string]string // device -> id
}

var _ nbdattach.Attacher = (*LoopAttacher)(nil)

type filePather interface{ FilePath() string }

func (a *LoopAttacher) Name() string { return "loop" }

func (a *LoopAttacher) Available() error {
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return fmt.Errorf("%w: no /dev/loop-control: %v", nbdattach.ErrUnavailable, err)
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		return fmt.Errorf("%w: losetup not found (util-linux)", nbdattach.ErrUnavailable)
	}
	return nil
}

func losetup(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "losetup", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("losetup %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

func (a *LoopAttacher) Attach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	fp, ok := b.(filePather)
	if !ok {
		return nil, fmt.Errorf("%w: loop attach needs a file-backed backend", nbdattach.ErrUnavailable)
	}
	args := []string{"--find", "--show"}
	if opts.ReadOnly {
		args = append(args, "--read-only")
	}
	dev, err := losetup(ctx, append(args, fp.FilePath())...)
	if err != nil {
		return nil, err
	}
	a.track(dev, id, true)
	return &loopDevice{a: a, path: dev, id: id}, nil
}

func (a *LoopAttacher) Reattach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	fp, ok := b.(filePather)
	if !ok {
		return nil, fmt.Errorf("%w: loop attach needs a file-backed backend", nbdattach.ErrUnavailable)
	}
	devs, err := a.list(ctx)
	if err != nil {
		return nil, err
	}
	for _, d := range devs {
		if d.BackFile == fp.FilePath() {
			a.track(d.Name, id, true)
			return &loopDevice{a: a, path: d.Name, id: id}, nil
		}
	}
	return nil, fmt.Errorf("volume %s: %w", id, nbdattach.ErrNotAttached)
}

type loopInfo struct {
	Name      string `json:"name"`
	BackFile  string `json:"back-file"`
	SizeLimit int64  `json:"sizelimit"`
}

func (a *LoopAttacher) list(ctx context.Context) ([]loopInfo, error) {
	out, err := losetup(ctx, "--json", "--list", "--output", "NAME,BACK-FILE")
	if err != nil {
		return nil, err
	}
	if out == "" {
		return nil, nil
	}
	var v struct {
		Loopdevices []loopInfo `json:"loopdevices"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		return nil, fmt.Errorf("losetup --json: %v", err)
	}
	return v.Loopdevices, nil
}

// List reports the loop devices this attacher knows it set up.
func (a *LoopAttacher) List(ctx context.Context) ([]nbdattach.DeviceInfo, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []nbdattach.DeviceInfo
	for dev, id := range a.attached {
		out = append(out, nbdattach.DeviceInfo{Path: dev, ID: id, Connected: true})
	}
	return out, nil
}

func (a *LoopAttacher) track(dev, id string, on bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.attached == nil {
		a.attached = map[string]string{}
	}
	if on {
		a.attached[dev] = id
	} else {
		delete(a.attached, dev)
	}
}

// Forget drops the record of attached devices without detaching them, as a
// crashed process would.
func (a *LoopAttacher) Forget() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.attached = nil
}

type loopDevice struct {
	a        *LoopAttacher
	path, id string
}

func (d *loopDevice) Path() string { return d.path }
func (d *loopDevice) ID() string   { return d.id }

func (d *loopDevice) Resize(ctx context.Context, _ int64) error {
	_, err := losetup(ctx, "--set-capacity", d.path)
	return err
}

func (d *loopDevice) Detach(ctx context.Context) error {
	if _, err := losetup(ctx, "--detach", d.path); err != nil {
		return err
	}
	d.a.track(d.path, d.id, false)
	return nil
}
