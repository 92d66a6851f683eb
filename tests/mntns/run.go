package mntns

import (
	"os"
	"testing"
)

// Main is a whole TestMain for a package that needs nothing else: its
// tests run isolated (Isolate), and the process exits with their status.
func Main(m *testing.M) {
	Isolate()
	os.Exit(m.Run())
}
