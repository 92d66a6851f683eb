package driver

import (
	"context"
	"errors"
	"fmt"

	"k8s.io/klog/v2"
)

// Keeping an encrypted volume's key across a node plugin restart.
//
// The kernel keeps /dev/nbdN and its mounts alive while the plugin
// restarts, and the new process must serve the device again within the
// kernel's dead-connection timeout (nbdattach/kernel). For an encrypted
// volume it needs the key for that, and the Secret is not at hand: only
// NodeStageVolume brings it. So NodeStage puts the volume's master key in
// the kernel's keyring (KeyStore, encryption_keyring_linux.go), never on
// disk, and the restarted plugin's re-attach opens the image with it
// (qcow2.OpenOptions.MasterKey, checked against the image's digest).
// NodeUnstageVolume and DeleteVolume remove it. The master key rather than
// the passphrase: it survives a key rotation while staged, and re-opening
// with it costs the digest's PBKDF2 only, not a key slot's seconds per
// volume inside the restart window.

// KeyStore keeps the master keys of staged encrypted volumes where a
// restarted plugin finds them and the disk never sees them.
type KeyStore interface {
	// Put stores (or replaces) the key of a volume.
	Put(volumeID string, key []byte) error
	// Get returns a copy of the key of a volume (the caller zeroes it), or
	// an error wrapping ErrKeyNotKept when there is none.
	Get(volumeID string) ([]byte, error)
	// Remove forgets the key of a volume; no key is not an error.
	Remove(volumeID string) error
}

// ErrKeyNotKept: the KeyStore holds no key for the volume.
var ErrKeyNotKept = errors.New("no key kept for the volume")

// masterKeyer is an open Image that can give its master key (qcow2Image).
type masterKeyer interface {
	MasterKey() ([]byte, error)
}

// keepKey stores the master key of a freshly staged encrypted volume. A
// failure does not fail the stage (the volume works now): it is logged,
// and a plugin restart will then report the volume abnormal until it is
// staged again, as it would without a keyring.
func (d *Driver) keepKey(ctx context.Context, id string, img Image) {
	mk, ok := img.(masterKeyer)
	if !ok || d.keys == nil {
		return
	}
	key, err := mk.MasterKey()
	if err == nil {
		err = d.keys.Put(id, key)
		clear(key)
	}
	if err != nil {
		klog.FromContext(ctx).Error(err, "The volume's key cannot be kept in the kernel keyring: after a node plugin restart the volume stays unusable until it is staged again", "volumeID", id)
	}
}

// forgetKey removes a volume's key (unstage, delete).
func (d *Driver) forgetKey(ctx context.Context, id string) {
	if d.keys == nil {
		return
	}
	if err := d.keys.Remove(id); err != nil {
		klog.FromContext(ctx).Error(err, "Removing the volume's key from the kernel keyring", "volumeID", id)
	}
}

// keptKey returns the master key a previous process kept for an encrypted
// volume, or an error that says what to do without it.
func (d *Driver) keptKey(id string) ([]byte, error) {
	if d.keys == nil {
		return nil, fmt.Errorf("%w: volume %q is encrypted and this node keeps no keys: unstage it and stage it again (restart the pod) to give it the Secret", ErrPrecondition, id)
	}
	key, err := d.keys.Get(id)
	if err != nil {
		return nil, fmt.Errorf("%w: volume %q is encrypted and its key is not in the kernel keyring (%w): nothing was read or written; unstage it and stage it again (restart the pod) to give it the Secret", ErrPrecondition, id, err)
	}
	return key, nil
}
