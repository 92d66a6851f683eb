package main

import (
	"os"
	"syscall"
)

// fileBlocks is the space allocated to f on the host (st_blocks * 512),
// what qemu-img calls the disk size.
func fileBlocks(f *os.File) int64 {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return 0
	}
	return st.Blocks * 512
}
