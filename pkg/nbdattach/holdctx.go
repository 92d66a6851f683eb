package nbdattach

import "context"

type holdCtxKey struct{}

// WithHoldContext returns ctx carrying hold, the context in which a backend
// may hold a request back before it starts the request's I/O (a throttle
// waiting for tokens). A server passes requests a ctx that does not end
// once their I/O may have begun, since a write cut off half way helps no
// one; but a request that has done nothing yet can be dropped once no one
// waits for its reply, and hold ends then: the NBD server ends it when its
// client closes the connection (the kernel does on its I/O timeout, and
// may send the request again on a new one: the stale copy must not run).
func WithHoldContext(ctx, hold context.Context) context.Context {
	return context.WithValue(ctx, holdCtxKey{}, hold)
}

// HoldContext is the context WithHoldContext put in ctx, or ctx itself.
func HoldContext(ctx context.Context) context.Context {
	if h, ok := ctx.Value(holdCtxKey{}).(context.Context); ok {
		return h
	}
	return ctx
}
