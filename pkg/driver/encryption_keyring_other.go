//go:build !linux

package driver

import "errors"

// KernelKeyring is Linux only; elsewhere every call fails, and a plugin
// restart leaves encrypted volumes unusable until they are staged again.
type KernelKeyring struct{ Prefix string }

var errNoKeyring = errors.New("keyring: the kernel keyring is Linux only")

func (KernelKeyring) Put(string, []byte) error   { return errNoKeyring }
func (KernelKeyring) Get(string) ([]byte, error) { return nil, errNoKeyring }
func (KernelKeyring) Remove(string) error        { return errNoKeyring }

func defaultKeyStore(string) (KeyStore, error) { return nil, errNoKeyring }
