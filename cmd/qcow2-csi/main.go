// Command qcow2-csi is the qcow2-csi driver and its operator tools in one
// binary: `serve` (the CSI driver), `img` (a qemu-img work-alike) and `nbd`
// (a qemu-nbd work-alike). This package parses flags and wires packages
// together; the logic lives under pkg/.
package main

import (
	"fmt"
	"os"
	"sort"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// command is one top-level subcommand. Faces register themselves from their
// own files with registerCommand, so adding a face touches no shared file.
type command struct {
	name  string
	short string
	run   func(args []string) int
}

var commands = map[string]command{}

func registerCommand(c command) { commands[c.name] = c }

func usage() {
	fmt.Fprintf(os.Stderr, "qcow2-csi %s: a Kubernetes CSI driver whose volumes are qcow2 images\n\n", version)
	fmt.Fprintf(os.Stderr, "Usage: qcow2-csi COMMAND [ARGS]\n\nCommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-8s %s\n", n, commands[n].short)
	}
	fmt.Fprintf(os.Stderr, "  %-8s %s\n", "version", "print the version")
	fmt.Fprintf(os.Stderr, "\nRun 'qcow2-csi COMMAND --help' for a command's flags.\n")
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(1)
	}
	name := os.Args[1]
	switch name {
	case "-h", "--help", "help":
		usage()
		return
	case "version", "--version":
		fmt.Println(version)
		return
	}
	c, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "qcow2-csi: unknown command %q (known: %s)\n", name, strings.Join(commandNames(), ", "))
		os.Exit(1)
	}
	os.Exit(c.run(os.Args[2:]))
}

func commandNames() []string {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
