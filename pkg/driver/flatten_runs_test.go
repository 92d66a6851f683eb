package driver

import "testing"

// A start that comes while a flatten ends (its last step found a snapshot
// on the base, then DeleteSnapshot deleted it and started the flatten
// again before the goroutine unregistered) must not be lost: the running
// flatten runs once more. A stopped one ends anyway.
func TestFlattenRunsStartWhileEnding(t *testing.T) {
	var r flattenRuns
	ctx, ok := r.start("v")
	if !ok {
		t.Fatal("first start refused")
	}
	if _, ok := r.start("v"); ok {
		t.Fatal("second start ran a second flatten of the same volume")
	}
	if r.done(ctx, "v") {
		t.Fatal("a start while the flatten ran was lost: it ended instead of running again")
	}
	if !r.done(ctx, "v") {
		t.Fatal("the flatten ran again although no start came since")
	}
	ctx, ok = r.start("v")
	if !ok {
		t.Fatal("start after the end refused")
	}
	r.stop("v")
	r.start("v")
	if !r.done(ctx, "v") {
		t.Fatal("a stopped flatten ran again")
	}
	r.stopAll() // returns: every registration was ended
}
