package main

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/imagebackend"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// snapshotParam parses qemu-nbd's -l argument: 'snapshot.id=[ID],
// snapshot.name=[NAME]' (either or both) or a bare ID or name.
func snapshotParam(s string) (id, name string, err error) {
	if !strings.HasPrefix(s, "snapshot.") {
		return "", "", nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		switch {
		case !ok:
			return "", "", fmt.Errorf("-l %q: %q is not key=value", s, kv)
		case k == "snapshot.id":
			id = v
		case k == "snapshot.name":
			name = v
		default:
			return "", "", fmt.Errorf("-l %q: unknown key %q (snapshot.id or snapshot.name)", s, k)
		}
	}
	if id == "" && name == "" {
		return "", "", fmt.Errorf("-l %q names no snapshot", s)
	}
	return id, name, nil
}

// openSnapshotBackend opens the snapshot -l names, read-only.
func openSnapshotBackend(img *qcow2.Image, file, param string, opts imagebackend.Options) (*imagebackend.Backend, func() error, error) {
	id, name, err := snapshotParam(param)
	if err != nil {
		return nil, nil, err
	}
	key := param
	switch {
	case id != "":
		key = id
	case name != "":
		key = name
	}
	view, err := img.OpenSnapshot(key)
	if errors.Is(err, qcow2.ErrSnapshotNotFound) {
		return nil, nil, fmt.Errorf("-l %q: %w in %s", param, qcow2.ErrSnapshotNotFound, filepath.Base(file))
	}
	if err != nil {
		return nil, nil, err
	}
	info := view.Info()
	if (id != "" && info.ID != id) || (name != "" && info.Name != name) {
		view.Close()
		return nil, nil, fmt.Errorf("-l %q: %w in %s", param, qcow2.ErrSnapshotNotFound, filepath.Base(file))
	}
	b, err := imagebackend.NewSnapshot(img, view, opts)
	if err != nil {
		view.Close()
		return nil, nil, err
	}
	return b, func() error {
		err := view.Close()
		if cerr := img.Close(); err == nil {
			err = cerr
		}
		return err
	}, nil
}
