// Package kernel is the "nbd" nbdattach.Attacher: it turns a Backend into
// /dev/nbdN through the Linux kernel's NBD driver, configured over generic
// netlink (family "nbd"), and serves the sockets it hands the kernel with
// package nbd's ServeTransmission. Devices carry the caller's identifier as
// the kernel's backend identifier, so a restarted process finds them in
// sysfs and hands the kernel fresh sockets (Reattach). See docs/nbd-attach.md.
package kernel
