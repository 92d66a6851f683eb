package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// negotiated is what the option haggling settled on, handed to transmission.
type negotiated struct {
	exp        *Export
	structured bool
	meta       []metaContext
	// blockSizes: the client asked for NBD_INFO_BLOCK_SIZE, so it promised to
	// honour the minimum and it is enforced.
	blockSizes bool
}

// handshake is the server side of the fixed newstyle negotiation on one
// connection.
type handshake struct {
	s    *Server
	rw   io.ReadWriter
	br   *bufio.Reader
	opt  uint32 // option being answered
	out  []byte
	neg  negotiated
	meta struct {
		export string
		set    []metaContext
		done   bool
	}
}

// errAbort: the client ended the negotiation with NBD_OPT_ABORT.
var errAbort = errors.New("client aborted the negotiation")

// runRecovering is run with a panic (in the backend's Size, say) turned
// into an error that ends this connection, not the server.
func (h *handshake) runRecovering() (neg *negotiated, err error) {
	defer func() {
		if p := recover(); p != nil {
			neg, err = nil, panicError(h.s.log, "negotiating", p)
		}
	}()
	return h.run()
}

// run negotiates until the client picks an export (returned), aborts or
// breaks the protocol.
func (h *handshake) run() (*negotiated, error) {
	var greet [18]byte
	binary.BigEndian.PutUint64(greet[0:], nbdMagic)
	binary.BigEndian.PutUint64(greet[8:], optMagic)
	binary.BigEndian.PutUint16(greet[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := h.rw.Write(greet[:]); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(h.br, cf[:]); err != nil {
		return nil, fmt.Errorf("%w: reading client flags: %v", ErrProtocol, err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		return nil, fmt.Errorf("%w: unknown client flags %#x", ErrProtocol, flags)
	}
	noZeroes := flags&clientFlagNoZeroes != 0
	for {
		var oh [16]byte
		if _, err := io.ReadFull(h.br, oh[:]); err != nil {
			return nil, fmt.Errorf("%w: reading option header: %v", ErrProtocol, err)
		}
		if m := binary.BigEndian.Uint64(oh[0:]); m != optMagic {
			return nil, fmt.Errorf("%w: option magic %#x, want %#x", ErrProtocol, m, optMagic)
		}
		h.opt = binary.BigEndian.Uint32(oh[8:])
		n := binary.BigEndian.Uint32(oh[12:])
		if n > maxOptionSize {
			// Refused before a byte of it is read. NBD_OPT_EXPORT_NAME
			// has no error reply: the spec's answer is to disconnect.
			if h.opt == optExportName {
				return nil, fmt.Errorf("%w: export name of %d bytes", ErrProtocol, n)
			}
			if n > maxOptionDrain {
				_ = h.replyErr(repErrTooBig, "option data of %d bytes exceeds %d; disconnecting", n, maxOptionSize)
				return nil, fmt.Errorf("%w: option %d claims %d bytes of data (limit %d)", ErrProtocol, h.opt, n, maxOptionSize)
			}
			if _, err := io.CopyN(io.Discard, h.br, int64(n)); err != nil {
				return nil, fmt.Errorf("%w: draining %d-byte option %d: %v", ErrProtocol, n, h.opt, err)
			}
			if err := h.replyErr(repErrTooBig, "option data of %d bytes exceeds %d", n, maxOptionSize); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(h.br, data); err != nil {
			return nil, fmt.Errorf("%w: reading %d-byte option %d: %v", ErrProtocol, n, h.opt, err)
		}
		done, err := h.option(data, noZeroes)
		if err != nil {
			return nil, err
		}
		if done {
			return &h.neg, nil
		}
	}
}

// option answers one option; done reports that transmission begins.
func (h *handshake) option(data []byte, noZeroes bool) (done bool, err error) {
	switch h.opt {
	case optExportName:
		exp := h.s.export(string(data))
		if exp == nil || len(data) > maxStringSize {
			return false, fmt.Errorf("%w: %q", ErrUnknownExport, truncate(string(data)))
		}
		var b [8 + 2 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(exp.Backend.Size()))
		binary.BigEndian.PutUint16(b[8:], exp.TransmissionFlags())
		out := b[:]
		if noZeroes {
			out = b[:10]
		}
		if _, err := h.rw.Write(out); err != nil {
			return false, err
		}
		h.neg.exp = exp
		h.neg.meta = nil // no meta contexts without structured GO
		return true, nil
	case optAbort:
		h.reply(repAck, nil)
		return false, errAbort
	case optList:
		if len(data) != 0 {
			return false, h.replyErr(repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, e := range h.s.order {
			b := make([]byte, 0, 4+len(e.Name)+len(e.Description))
			b = binary.BigEndian.AppendUint32(b, uint32(len(e.Name)))
			b = append(b, e.Name...)
			b = append(b, e.Description...)
			if err := h.reply(repServer, b); err != nil {
				return false, err
			}
		}
		return false, h.reply(repAck, nil)
	case optInfo, optGo:
		return h.infoGo(data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, h.replyErr(repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		if h.neg.structured {
			return false, h.replyErr(repErrInvalid, "structured replies already negotiated")
		}
		h.neg.structured = true
		return false, h.reply(repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return false, h.metaContext(data)
	default:
		return false, h.replyErr(repErrUnsup, "option %d not supported", h.opt)
	}
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO.
func (h *handshake) infoGo(data []byte) (bool, error) {
	p := parser{b: data}
	name, ok := p.str()
	nreq, ok2 := p.u16()
	if !ok || !ok2 || p.left() != 2*int(nreq) {
		return false, h.replyErr(repErrInvalid, "malformed NBD_OPT_INFO/GO data")
	}
	var wantName, wantDesc, wantBlock bool
	for range nreq {
		t, _ := p.u16()
		switch t {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		case infoBlockSize:
			wantBlock = true
		}
	}
	exp := h.s.export(name)
	if exp == nil {
		return false, h.replyErr(repErrUnknown, "export %q not found", truncate(name))
	}
	var b [12]byte
	info := func(t uint16, payload ...[]byte) error {
		out := binary.BigEndian.AppendUint16(make([]byte, 0, 2+12), t)
		for _, x := range payload {
			out = append(out, x...)
		}
		return h.reply(repInfo, out)
	}
	binary.BigEndian.PutUint64(b[0:], uint64(exp.Backend.Size()))
	binary.BigEndian.PutUint16(b[8:], exp.TransmissionFlags())
	if err := info(infoExport, b[:10]); err != nil {
		return false, err
	}
	if wantName {
		if err := info(infoName, []byte(exp.Name)); err != nil {
			return false, err
		}
	}
	if wantDesc && exp.Description != "" {
		if err := info(infoDescription, []byte(exp.Description)); err != nil {
			return false, err
		}
	}
	// qemu-nbd sends block sizes whether asked or not; clients that did not
	// ask are not held to the minimum.
	binary.BigEndian.PutUint32(b[0:], exp.minBlock())
	binary.BigEndian.PutUint32(b[4:], exp.preferredBlock())
	binary.BigEndian.PutUint32(b[8:], exp.maxPayload())
	if err := info(infoBlockSize, b[:12]); err != nil {
		return false, err
	}
	if err := h.reply(repAck, nil); err != nil {
		return false, err
	}
	if h.opt == optInfo {
		return false, nil
	}
	h.neg.exp = exp
	h.neg.blockSizes = wantBlock
	if h.neg.structured && h.meta.done && h.meta.export == name {
		h.neg.meta = h.meta.set
	}
	return true, nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
func (h *handshake) metaContext(data []byte) error {
	if !h.neg.structured {
		return h.replyErr(repErrInvalid, "negotiate structured replies first")
	}
	req, err := parseMetaRequest(data)
	if err != nil {
		return h.replyErr(repErrInvalid, "%v", err)
	}
	set := h.opt == optSetMetaContext
	if set {
		// A failed SET leaves nothing selected.
		h.meta.done, h.meta.set = false, nil
	}
	exp := h.s.export(req.export)
	if exp == nil {
		return h.replyErr(repErrUnknown, "export %q not found", truncate(req.export))
	}
	avail := exp.metaContexts()
	var chosen []metaContext
	if len(req.queries) == 0 && !set {
		chosen = avail
	}
	for _, q := range req.queries {
		for _, m := range avail {
			if matchContext(q, m.name, !set) && !containsContext(chosen, m.id) {
				chosen = append(chosen, m)
			}
		}
	}
	for _, m := range chosen {
		b := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(m.name)), m.id)
		b = append(b, m.name...)
		if err := h.reply(repMetaContext, b); err != nil {
			return err
		}
	}
	if set {
		h.meta.done, h.meta.set, h.meta.export = true, chosen, req.export
	}
	return h.reply(repAck, nil)
}

// matchContext: exact names select; for LIST, a bare namespace ("base:",
// "qemu:") or "qemu:dirty-bitmap:" lists every context under it, as qemu-nbd.
func matchContext(query, name string, list bool) bool {
	if query == name {
		return true
	}
	if !list {
		return false
	}
	switch query {
	case "base:", "qemu:", nbdattach.ContextDirtyBitmapPrefix:
		return strings.HasPrefix(name, query)
	}
	return false
}

func containsContext(ms []metaContext, id uint32) bool {
	for _, m := range ms {
		if m.id == id {
			return true
		}
	}
	return false
}

// metaRequest is the data of LIST/SET_META_CONTEXT.
type metaRequest struct {
	export  string
	queries []string
}

// parseMetaRequest decodes a meta context option, bounding every count.
func parseMetaRequest(data []byte) (metaRequest, error) {
	p := parser{b: data}
	var r metaRequest
	var ok bool
	if r.export, ok = p.str(); !ok {
		return r, errors.New("malformed export name")
	}
	nq, ok := p.u32()
	if !ok {
		return r, errors.New("missing query count")
	}
	if nq > maxMetaQueries {
		return r, fmt.Errorf("%d queries exceed the limit of %d", nq, maxMetaQueries)
	}
	for i := range nq {
		q, ok := p.str()
		if !ok {
			return r, fmt.Errorf("malformed query %d", i)
		}
		r.queries = append(r.queries, q)
	}
	if p.left() != 0 {
		return r, fmt.Errorf("%d trailing bytes", p.left())
	}
	return r, nil
}

// parser is a big-endian cursor over option data; every read checks bounds.
type parser struct{ b []byte }

func (p *parser) left() int { return len(p.b) }

func (p *parser) u16() (uint16, bool) {
	if len(p.b) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(p.b)
	p.b = p.b[2:]
	return v, true
}

func (p *parser) u32() (uint32, bool) {
	if len(p.b) < 4 {
		return 0, false
	}
	v := binary.BigEndian.Uint32(p.b)
	p.b = p.b[4:]
	return v, true
}

// str reads a u32 length and that many bytes, at most maxStringSize.
func (p *parser) str() (string, bool) {
	n, ok := p.u32()
	if !ok || n > maxStringSize || int(n) > len(p.b) {
		return "", false
	}
	s := string(p.b[:n])
	p.b = p.b[n:]
	return s, true
}

func (h *handshake) reply(typ uint32, data []byte) error {
	out := h.out[:0]
	out = binary.BigEndian.AppendUint64(out, optReplyMagic)
	out = binary.BigEndian.AppendUint32(out, h.opt)
	out = binary.BigEndian.AppendUint32(out, typ)
	out = binary.BigEndian.AppendUint32(out, uint32(len(data)))
	out = append(out, data...)
	h.out = out
	_, err := h.rw.Write(out)
	return err
}

func (h *handshake) replyErr(typ uint32, format string, args ...any) error {
	return h.reply(typ, []byte(truncate(fmt.Sprintf(format, args...))))
}

// truncate keeps client-supplied text in messages short.
func truncate(s string) string {
	if len(s) > 256 {
		return s[:256] + "..."
	}
	return s
}
