// Package fuse is the "fuse" nbdattach.Attacher, for kernels without nbd:
// each device is a regular file of one FUSE filesystem this process serves
// (go-fuse), whose contents are the Backend, with a loop device bound to
// that file. Its devices cannot outlive the process; a new process cleans up
// what a dead one left (StaleCleaner). See docs/fuse-attach.md.
package fuse
