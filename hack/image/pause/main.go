// Command pause is the sandbox process of a pod: it holds the pod's
// namespaces, reaps orphaned children (it is PID 1 when the pod shares its
// process namespace) and exits on SIGINT or SIGTERM. The e2e suite builds it
// statically into the sandbox image containerd is configured with, since no
// registry is reachable there.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
