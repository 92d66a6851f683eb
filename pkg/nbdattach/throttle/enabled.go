//go:build !nothrottle

package throttle

// Enabled is false in builds with the nothrottle tag, which attach devices
// without a Throttle in front: the baseline of tests/bench/qos.sh.
const Enabled = true
