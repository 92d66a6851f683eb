//go:build linux

package driver

import (
	"errors"
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// KernelKeyring keeps keys in the Linux kernel's keyring: a "user" key per
// volume, described "qcow2-csi:<Prefix>:<volume ID>", linked into the user
// keyring of the plugin's uid (root's, on a node). That keyring lives in
// kernel memory as long as the uid has processes (always, for root), so a
// restarted plugin finds it, and it is gone at reboot, as the devices are.
//
// Possession: a container gets a fresh session keyring (runc joins a new
// one), which does not link the user keyring, so a restarted plugin does
// not possess the keys its predecessor made. The key is therefore created
// in the calling thread's keyring, which that thread possesses, given
// permissions for the possessor and for its own uid only (no group, no
// other), and only then linked into the user keyring: the next process of the same uid can
// search, read and invalidate it; processes of other uids cannot even see
// it. Root in the host's user namespace that may call keyctl can read it,
// as it could read the plugin's memory.
type KernelKeyring struct {
	// Prefix tells apart the keys of several drivers on one node (the
	// driver name).
	Prefix string
}

const (
	keyType = "user"
	// keyPerm: possessor and user (same uid) view, read, write, search,
	// link, setattr; group and other nothing.
	keyPerm = 0x3f3f0000
)

// defaultKeyStore is the kernel keyring when this process may use it: a
// container's seccomp profile may refuse keyctl (the runtime default
// profiles of Docker and containerd do; the node plugin is privileged,
// which runs it unconfined).
func defaultKeyStore(driverName string) (KeyStore, error) {
	if _, err := unix.KeyctlGetKeyringID(unix.KEY_SPEC_USER_KEYRING, true); err != nil {
		return nil, fmt.Errorf("keyring: the user keyring: %w", err)
	}
	return KernelKeyring{Prefix: driverName}, nil
}

func (k KernelKeyring) description(volumeID string) string {
	return "qcow2-csi:" + k.Prefix + ":" + volumeID
}

// Put implements KeyStore. Linking a key displaces the one of the same
// description already in the user keyring, so a re-stage replaces it.
//
// Every call runs on one OS thread, in that thread's keyring: keyrings
// hang on a thread's credentials, and a Go goroutine moves between
// threads. (It used the process keyring, which only threads made after it
// share: setperm on another thread did not possess the new key and failed
// with EACCES, now and then, and the key was not kept.)
func (k KernelKeyring) Put(volumeID string, key []byte) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	id, err := unix.AddKey(keyType, k.description(volumeID), key, unix.KEY_SPEC_THREAD_KEYRING)
	if err != nil {
		return fmt.Errorf("keyring: add_key: %w", err)
	}
	// Out of the thread keyring whatever happens: it dies with the thread.
	defer unix.KeyctlInt(unix.KEYCTL_UNLINK, id, unix.KEY_SPEC_THREAD_KEYRING, 0, 0)
	if err := unix.KeyctlSetperm(id, keyPerm); err != nil {
		_, _ = unix.KeyctlInt(unix.KEYCTL_INVALIDATE, id, 0, 0, 0)
		return fmt.Errorf("keyring: setperm: %w", err)
	}
	if _, err := unix.KeyctlInt(unix.KEYCTL_LINK, id, unix.KEY_SPEC_USER_KEYRING, 0, 0); err != nil {
		_, _ = unix.KeyctlInt(unix.KEYCTL_INVALIDATE, id, 0, 0, 0)
		return fmt.Errorf("keyring: link into the user keyring: %w", err)
	}
	return nil
}

// Get implements KeyStore.
func (k KernelKeyring) Get(volumeID string) ([]byte, error) {
	id, err := unix.KeyctlSearch(unix.KEY_SPEC_USER_KEYRING, keyType, k.description(volumeID), 0)
	if err != nil {
		if errors.Is(err, unix.ENOKEY) || errors.Is(err, unix.EKEYREVOKED) || errors.Is(err, unix.EKEYEXPIRED) {
			return nil, fmt.Errorf("%w: %s", ErrKeyNotKept, k.description(volumeID))
		}
		return nil, fmt.Errorf("keyring: search %s: %w", k.description(volumeID), err)
	}
	buf := make([]byte, 128) // master keys are 32 or 64 bytes
	for {
		n, err := unix.KeyctlBuffer(unix.KEYCTL_READ, id, buf, 0)
		if err != nil {
			clear(buf)
			return nil, fmt.Errorf("keyring: read %s: %w", k.description(volumeID), err)
		}
		if n <= len(buf) {
			key := append([]byte(nil), buf[:n]...)
			clear(buf)
			return key, nil
		}
		clear(buf)
		buf = make([]byte, n)
	}
}

// Remove implements KeyStore: the key is invalidated (gone from every
// keyring at once).
func (k KernelKeyring) Remove(volumeID string) error {
	id, err := unix.KeyctlSearch(unix.KEY_SPEC_USER_KEYRING, keyType, k.description(volumeID), 0)
	if err != nil {
		if errors.Is(err, unix.ENOKEY) || errors.Is(err, unix.EKEYREVOKED) || errors.Is(err, unix.EKEYEXPIRED) {
			return nil
		}
		return fmt.Errorf("keyring: search %s: %w", k.description(volumeID), err)
	}
	if _, err := unix.KeyctlInt(unix.KEYCTL_INVALIDATE, id, 0, 0, 0); err != nil && !errors.Is(err, unix.ENOKEY) {
		return fmt.Errorf("keyring: invalidate %s: %w", k.description(volumeID), err)
	}
	return nil
}
