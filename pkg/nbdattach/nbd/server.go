package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// aLongTimeAgo is a deadline in the past, used to unblock a pending read.
var aLongTimeAgo = time.Unix(1, 0)

// DefaultHandshakeTimeout is how long a client may take to negotiate, as
// qemu-nbd (since the fix for CVE-2024-7409).
const DefaultHandshakeTimeout = 10 * time.Second

// ServerOptions tune a Server. Zero values mean defaults.
type ServerOptions struct {
	// Logger receives connection-level events; nil logs nothing.
	Logger *slog.Logger
	// MaxConnections bounds the clients served at once; further ones wait in
	// the listen backlog until one leaves (qemu-nbd -e). Zero: no bound.
	MaxConnections int
	// HandshakeTimeout bounds the whole negotiation of one client, from
	// the greeting to NBD_OPT_GO: a client that connects and never
	// negotiates (or trickles its options) would otherwise hold a
	// connection slot for good, the only one with MaxConnections 1. Zero
	// means qemu-nbd's 10 s; negative means no limit (for tests of the
	// handshake itself, as qemu-nbd's --handshake-limit=0).
	HandshakeTimeout time.Duration
	// StopWhenIdle makes Serve return once a client has been served and no
	// client remains (qemu-nbd without -t).
	StopWhenIdle bool
}

// Server serves exports over fixed newstyle NBD to clients that negotiate
// (qemu-img, nbdinfo, libnbd, fio, ...). The kernel, which does not
// negotiate, is served with ServeTransmission instead.
type Server struct {
	opts    ServerOptions
	log     *slog.Logger
	exports map[string]*Export
	order   []*Export

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	served    int
	closing   bool
	idle      chan struct{} // closed when StopWhenIdle fires
	wg        sync.WaitGroup
	ctx       context.Context
	cancel    context.CancelFunc
}

// NewServer checks the exports and returns a server for them; names must be
// unique.
func NewServer(opts ServerOptions, exports ...*Export) (*Server, error) {
	if len(exports) == 0 {
		return nil, errors.New("nbd server: no exports")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.HandshakeTimeout == 0 {
		opts.HandshakeTimeout = DefaultHandshakeTimeout
	}
	s := &Server{
		opts:      opts,
		log:       log,
		exports:   map[string]*Export{},
		listeners: map[net.Listener]struct{}{},
		conns:     map[net.Conn]struct{}{},
		idle:      make(chan struct{}),
	}
	for _, e := range exports {
		if err := e.Validate(); err != nil {
			return nil, err
		}
		if _, dup := s.exports[e.Name]; dup {
			return nil, fmt.Errorf("nbd server: export %q given twice", e.Name)
		}
		s.exports[e.Name] = e
		s.order = append(s.order, e)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

func (s *Server) export(name string) *Export { return s.exports[name] }

// Serve accepts clients on ln until Shutdown, ctx ends, ln fails, or (with
// StopWhenIdle) the last client leaves. It closes ln on return and returns
// nil for Shutdown and StopWhenIdle.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		ln.Close()
		return nbdattach.ErrShutdown
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	served := make(chan struct{})
	defer close(served)
	go func() {
		select {
		case <-s.idle:
			ln.Close()
		case <-s.ctx.Done():
		case <-served:
		}
	}()

	var slots chan struct{}
	if s.opts.MaxConnections > 0 {
		slots = make(chan struct{}, s.opts.MaxConnections)
	}
	for {
		if slots != nil {
			select {
			case slots <- struct{}{}:
			case <-s.ctx.Done():
				return nil
			case <-s.idle:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		conn, err := ln.Accept()
		if err != nil {
			select {
			case <-s.ctx.Done():
				return nil
			case <-s.idle:
				return nil
			default:
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if slots != nil {
					<-slots
				}
				continue
			}
			return fmt.Errorf("nbd server: accept: %w", err)
		}
		go func() {
			if err := s.ServeConn(ctx, conn); err != nil {
				s.log.Info("nbd client ended with an error", "remote", conn.RemoteAddr().String(), "err", err)
			}
			if slots != nil {
				<-slots
			}
		}()
	}
}

// ServeConn negotiates with one client and serves the export it picks,
// until it disconnects. conn is closed on return.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn) error {
	if !s.track(conn) {
		conn.Close()
		return nbdattach.ErrShutdown
	}
	defer s.untrack(conn)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()

	if s.opts.HandshakeTimeout > 0 {
		conn.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	}
	// A shutdown during the negotiation ends it at once.
	stopHS := context.AfterFunc(ctx, func() { conn.SetDeadline(aLongTimeAgo) })
	h := &handshake{s: s, rw: conn, br: bufio.NewReaderSize(conn, readBufSize)}
	neg, err := h.runRecovering()
	if !stopHS() {
		conn.Close()
		return nil
	}
	if err != nil {
		conn.Close()
		if errors.Is(err, errAbort) {
			return nil
		}
		return err
	}
	conn.SetDeadline(time.Time{})
	if ctx.Err() != nil {
		conn.Close()
		return nil
	}
	c := newTransmission(conn, neg.exp, h.br, s.log)
	c.structured = neg.structured
	c.meta = neg.meta
	if neg.blockSizes {
		c.minBlock = neg.exp.minBlock()
	}
	err = c.serve(ctx)
	if s.ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func (s *Server) track(conn net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.conns[conn] = struct{}{}
	s.served++
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(conn net.Conn) {
	s.mu.Lock()
	delete(s.conns, conn)
	if s.opts.StopWhenIdle && len(s.conns) == 0 && s.served > 0 {
		select {
		case <-s.idle:
		default:
			close(s.idle)
		}
	}
	s.mu.Unlock()
	s.wg.Done()
}

// Shutdown stops accepting, stops reading new requests, answers those in
// flight and closes every connection. It returns when all are closed, or
// with ctx's error (after closing them hard) when ctx ends first.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	s.cancel() // before closing listeners: Serve tells Shutdown from failure by it
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		<-done
		return ctx.Err()
	}
}
