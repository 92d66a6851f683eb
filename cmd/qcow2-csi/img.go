package main

import (
	"fmt"
	"os"
	"sort"
)

// imgCommand is one `qcow2-csi img` sub-command, modelled on the qemu-img
// sub-command of the same name. Each lives in its own img_NAME.go file and
// registers itself in init, so faces added by different features never edit a
// shared table.
type imgCommand struct {
	name  string
	usage string // one line, qemu-img's synopsis
	run   func(args []string) int
}

var imgCommands = map[string]imgCommand{}

func registerImgCommand(c imgCommand) { imgCommands[c.name] = c }

func init() {
	registerCommand(command{name: "img", short: "image tool (qemu-img work-alike)", run: runImg})
}

func imgUsage() {
	fmt.Fprintf(os.Stderr, "Usage: qcow2-csi img COMMAND [ARGS]\n\nCommands (flags and exit codes as qemu-img 7.2):\n")
	names := make([]string, 0, len(imgCommands))
	for n := range imgCommands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %s\n", imgCommands[n].usage)
	}
}

func runImg(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		imgUsage()
		if len(args) == 0 {
			return 1
		}
		return 0
	}
	c, ok := imgCommands[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "qcow2-csi img: command %q not supported\n", args[0])
		imgUsage()
		return 1
	}
	return c.run(args[1:])
}
