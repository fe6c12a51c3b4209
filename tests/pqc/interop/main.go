// pqfed-interop: the other end of pqfed's TLS 1.3 channel (pqc/tls13.py), built on Go's
// crypto/tls and crypto/x509 (Go 1.27: X25519MLKEM768 and ML-DSA certificates and
// CertificateVerify, draft-ietf-tls-ecdhe-mlkem and draft-ietf-tls-mldsa), a TLS stack and
// X.509 parser that share no code with the OpenSSL that pqfed runs on.
//
//	pqfed-interop client --addr HOST:PORT --ca CA.pem --cert C.pem --key C.key [--groups G,..]
//	                     [--peer-uri URI] [--message TEXT]
//	pqfed-interop server --ca CA.pem --cert S.pem --key S.key [--groups G,..] [--peer-uri URI]
//	pqfed-interop x509 --ca CA.pem FILE.pem...
//
// client: a mutual handshake, then sends one line and reads the peer's one-line answer.
// server: listens on 127.0.0.1 (a free port), prints {"event":"listening","addr":...}, accepts
// one connection, reads one line and answers it reversed.
// Both print one JSON report on stdout ({"event":"done","ok":...}) and exit 0 only when the
// handshake, the verification of the peer and the exchange all succeeded.
// x509: parses certificates, PKCS#10 requests and CRLs (PEM) with Go's parser and checks each
// signature against the CA (the request: its own key), one JSON object per PEM block.
//
// The peer is verified against the CA file only (the federation's root, the only trust
// anchor), with the EKU of its side (serverAuth for a server, clientAuth for a client). pqfed
// node certificates name the node in a URI SAN (pqfed://<federation>/<role>/<node>), not a
// DNS name, so the client does not use crypto/tls's hostname check: it turns that off and
// runs the same chain verification itself in VerifyConnection, plus the URI pin.
package main

import (
	"bufio"
	"crypto/mldsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

const timeout = 20 * time.Second

type scheme struct {
	Name string `json:"name"`
	Code uint16 `json:"code"`
}

func schemeOf(s tls.SignatureScheme) scheme { return scheme{s.String(), uint16(s)} }

// report is what each side learnt; the tests read it.
type report struct {
	Event   string `json:"event"`
	Side    string `json:"side"`
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
	Version string `json:"version,omitempty"`
	Group   string `json:"group,omitempty"`
	Cipher  string `json:"cipher,omitempty"`
	// The scheme of our CertificateVerify: the one TLS 1.3 allows for our key
	// (draft-ietf-tls-mldsa: an ML-DSA-65 key signs with mldsa65 only).
	SignatureScheme *scheme `json:"signature_scheme,omitempty"`
	// The same for the peer's key: crypto/tls refuses a CertificateVerify whose scheme does
	// not fit the certificate's key, so a verified ML-DSA-65 leaf means mldsa65.
	PeerSignatureScheme *scheme `json:"peer_signature_scheme,omitempty"`
	// signature_algorithms the peer sent (ClientHello for our server, CertificateRequest
	// for our client).
	PeerOfferedSchemes []scheme `json:"peer_offered_schemes,omitempty"`
	PeerURIs           []string `json:"peer_uris,omitempty"`
	PeerKey            string   `json:"peer_key,omitempty"`
	PeerCertSignature  string   `json:"peer_certificate_signature,omitempty"`
	VerifiedChain      []string `json:"verified_chain,omitempty"`
	Sent               string   `json:"sent,omitempty"`
	Received           string   `json:"received,omitempty"`
}

func emit(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(b))
}

type endpointFlags struct {
	ca, cert, key, groups, peerURI string
}

func (e *endpointFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&e.ca, "ca", "", "federation CA certificate (PEM): the only trust anchor")
	fs.StringVar(&e.cert, "cert", "", "our certificate (PEM, ML-DSA-65)")
	fs.StringVar(&e.key, "key", "", "our private key (PKCS#8 PEM)")
	fs.StringVar(&e.groups, "groups", "X25519MLKEM768", "key exchange groups, comma separated")
	fs.StringVar(&e.peerURI, "peer-uri", "", "require this URI SAN on the peer's certificate")
}

var groupNames = map[string]tls.CurveID{
	"X25519MLKEM768":     tls.X25519MLKEM768,
	"SecP256r1MLKEM768":  tls.SecP256r1MLKEM768,
	"SecP384r1MLKEM1024": tls.SecP384r1MLKEM1024,
	"X25519":             tls.X25519,
	"P-256":              tls.CurveP256,
}

// loaded is one endpoint's TLS configuration plus what the handshake callbacks record.
type loaded struct {
	cfg     *tls.Config
	cert    tls.Certificate
	roots   *x509.CertPool
	offered []tls.SignatureScheme
	chain   []*x509.Certificate
}

func load(e *endpointFlags, side string) (*loaded, error) {
	caPEM, err := os.ReadFile(e.ca)
	if err != nil {
		return nil, fmt.Errorf("--ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("--ca: no certificate in %s", e.ca)
	}
	cert, err := tls.LoadX509KeyPair(e.cert, e.key)
	if err != nil {
		return nil, fmt.Errorf("--cert/--key: %w", err)
	}
	var curves []tls.CurveID
	for _, g := range strings.Split(e.groups, ",") {
		id, ok := groupNames[g]
		if !ok {
			return nil, fmt.Errorf("--groups: unknown group %q", g)
		}
		curves = append(curves, id)
	}
	l := &loaded{cert: cert, roots: roots}
	l.cfg = &tls.Config{
		MinVersion:       tls.VersionTLS13,
		MaxVersion:       tls.VersionTLS13,
		CurvePreferences: curves,
		// Verification: see the package comment.
		VerifyConnection: func(cs tls.ConnectionState) error {
			return l.verifyPeer(cs, side, e.peerURI)
		},
	}
	if side == "client" {
		l.cfg.InsecureSkipVerify = true // hostname check only; the chain is checked below
		l.cfg.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			l.offered = cri.SignatureSchemes
			return &l.cert, nil
		}
	} else {
		l.cfg.ClientAuth = tls.RequireAndVerifyClientCert
		l.cfg.ClientCAs = roots
		l.cfg.GetCertificate = func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			l.offered = hello.SignatureSchemes
			return &l.cert, nil
		}
	}
	return l, nil
}

func (l *loaded) verifyPeer(cs tls.ConnectionState, side, peerURI string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the peer sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	usage := x509.ExtKeyUsageServerAuth
	if side == "server" {
		usage = x509.ExtKeyUsageClientAuth
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots: l.roots, Intermediates: x509.NewCertPool(),
		KeyUsages: []x509.ExtKeyUsage{usage},
	})
	if err != nil {
		return fmt.Errorf("peer certificate: %w", err)
	}
	l.chain = chains[0]
	if peerURI != "" {
		for _, u := range leaf.URIs {
			if u.String() == peerURI {
				return nil
			}
		}
		return fmt.Errorf("peer certificate: URI SAN %v, pinned %s", leaf.URIs, peerURI)
	}
	return nil
}

// schemeForKey: the TLS 1.3 signature scheme an ML-DSA key signs CertificateVerify with.
func schemeForKey(pub any) *scheme {
	k, ok := pub.(*mldsa.PublicKey)
	if !ok {
		return nil
	}
	var s tls.SignatureScheme
	switch k.Parameters() {
	case mldsa.MLDSA44():
		s = tls.MLDSA44
	case mldsa.MLDSA65():
		s = tls.MLDSA65
	case mldsa.MLDSA87():
		s = tls.MLDSA87
	default:
		return nil
	}
	out := schemeOf(s)
	return &out
}

func (l *loaded) fill(r *report, conn *tls.Conn) {
	cs := conn.ConnectionState()
	r.Version = tls.VersionName(cs.Version)
	r.Group = cs.CurveID.String()
	r.Cipher = tls.CipherSuiteName(cs.CipherSuite)
	r.SignatureScheme = schemeForKey(l.cert.Leaf.PublicKey)
	for _, s := range l.offered {
		r.PeerOfferedSchemes = append(r.PeerOfferedSchemes, schemeOf(s))
	}
	if len(cs.PeerCertificates) > 0 {
		leaf := cs.PeerCertificates[0]
		for _, u := range leaf.URIs {
			r.PeerURIs = append(r.PeerURIs, u.String())
		}
		r.PeerKey = leaf.PublicKeyAlgorithm.String()
		if k, ok := leaf.PublicKey.(*mldsa.PublicKey); ok {
			r.PeerKey = k.Parameters().String()
		}
		r.PeerCertSignature = leaf.SignatureAlgorithm.String()
		r.PeerSignatureScheme = schemeForKey(leaf.PublicKey)
	}
	for _, c := range l.chain {
		r.VerifiedChain = append(r.VerifiedChain, c.Subject.String())
	}
}

func reverse(s string) string {
	b := []byte(s)
	for i, j := 0, len(b)-1; i < j; i, j = i+1, j-1 {
		b[i], b[j] = b[j], b[i]
	}
	return string(b)
}

func runClient(args []string) int {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	var e endpointFlags
	e.register(fs)
	addr := fs.String("addr", "", "server address host:port")
	message := fs.String("message", "hello from crypto/tls", "the line to send")
	_ = fs.Parse(args)
	r := report{Event: "done", Side: "client"}
	defer func() { emit(r) }()
	l, err := load(&e, "client")
	if err != nil {
		r.Error = err.Error()
		return 2
	}
	d := &net.Dialer{Timeout: timeout}
	conn, err := tls.DialWithDialer(d, "tcp", *addr, l.cfg)
	if err != nil {
		r.Error = "handshake: " + err.Error()
		return 1
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	l.fill(&r, conn)
	// TLS 1.3: the server judges our certificate after our handshake completed; a refusal
	// arrives as an alert on the first read.
	r.Sent = *message
	if _, err := conn.Write([]byte(*message + "\n")); err != nil {
		r.Error = "write: " + err.Error()
		return 1
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		r.Error = "read: " + err.Error()
		return 1
	}
	r.Received = strings.TrimSuffix(line, "\n")
	r.OK = true
	return 0
}

func runServer(args []string) int {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	var e endpointFlags
	e.register(fs)
	_ = fs.Parse(args)
	r := report{Event: "done", Side: "server"}
	defer func() { emit(r) }()
	l, err := load(&e, "server")
	if err != nil {
		r.Error = err.Error()
		return 2
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		r.Error = err.Error()
		return 2
	}
	defer ln.Close()
	emit(map[string]string{"event": "listening", "addr": ln.Addr().String()})
	_ = ln.(*net.TCPListener).SetDeadline(time.Now().Add(timeout))
	raw, err := ln.Accept()
	if err != nil {
		r.Error = "accept: " + err.Error()
		return 1
	}
	_ = raw.SetDeadline(time.Now().Add(timeout))
	conn := tls.Server(raw, l.cfg)
	defer conn.Close()
	if err := conn.Handshake(); err != nil {
		r.Error = "handshake: " + err.Error()
		return 1
	}
	l.fill(&r, conn)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		r.Error = "read: " + err.Error()
		return 1
	}
	r.Received = strings.TrimSuffix(line, "\n")
	r.Sent = reverse(r.Received)
	if _, err := conn.Write([]byte(r.Sent + "\n")); err != nil {
		r.Error = "write: " + err.Error()
		return 1
	}
	r.OK = true
	return 0
}

// x509Report describes one PEM block as Go's crypto/x509 reads it.
type x509Report struct {
	File       string   `json:"file"`
	Type       string   `json:"type"`
	OK         bool     `json:"ok"`
	Error      string   `json:"error,omitempty"`
	Subject    string   `json:"subject,omitempty"`
	Issuer     string   `json:"issuer,omitempty"`
	URIs       []string `json:"uris,omitempty"`
	Key        string   `json:"key,omitempty"`
	Signature  string   `json:"signature,omitempty"`
	IsCA       bool     `json:"is_ca,omitempty"`
	MaxPathLen *int     `json:"max_path_len,omitempty"`
	KeyUsage   int      `json:"key_usage,omitempty"`
	ExtUsage   []string `json:"ext_key_usage,omitempty"`
	Revoked    []string `json:"revoked,omitempty"`
	// The signature was checked: against the CA (certificate, CRL) or the request's own key.
	SignatureValid bool `json:"signature_valid"`
}

var extUsageNames = map[x509.ExtKeyUsage]string{
	x509.ExtKeyUsageServerAuth: "serverAuth", x509.ExtKeyUsageClientAuth: "clientAuth",
}

func keyName(pub any, alg x509.PublicKeyAlgorithm) string {
	if k, ok := pub.(*mldsa.PublicKey); ok {
		return k.Parameters().String()
	}
	return alg.String()
}

func describe(file string, block *pem.Block, ca *x509.Certificate) x509Report {
	r := x509Report{File: file, Type: block.Type}
	fail := func(err error) x509Report { r.Error = err.Error(); return r }
	switch block.Type {
	case "CERTIFICATE":
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return fail(err)
		}
		r.Subject, r.Issuer = c.Subject.String(), c.Issuer.String()
		for _, u := range c.URIs {
			r.URIs = append(r.URIs, u.String())
		}
		r.Key, r.Signature = keyName(c.PublicKey, c.PublicKeyAlgorithm), c.SignatureAlgorithm.String()
		r.IsCA, r.KeyUsage = c.IsCA, int(c.KeyUsage)
		if c.BasicConstraintsValid && c.IsCA {
			n := c.MaxPathLen
			r.MaxPathLen = &n
		}
		for _, u := range c.ExtKeyUsage {
			r.ExtUsage = append(r.ExtUsage, extUsageNames[u])
		}
		if err := c.CheckSignatureFrom(ca); err != nil {
			return fail(err)
		}
	case "CERTIFICATE REQUEST":
		q, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			return fail(err)
		}
		r.Subject = q.Subject.String()
		for _, u := range q.URIs {
			r.URIs = append(r.URIs, u.String())
		}
		r.Key, r.Signature = keyName(q.PublicKey, q.PublicKeyAlgorithm), q.SignatureAlgorithm.String()
		if err := q.CheckSignature(); err != nil {
			return fail(err)
		}
	case "X509 CRL":
		l, err := x509.ParseRevocationList(block.Bytes)
		if err != nil {
			return fail(err)
		}
		r.Issuer, r.Signature = l.Issuer.String(), l.SignatureAlgorithm.String()
		for _, e := range l.RevokedCertificateEntries {
			r.Revoked = append(r.Revoked, e.SerialNumber.String())
		}
		if err := l.CheckSignatureFrom(ca); err != nil {
			return fail(err)
		}
	default:
		return fail(fmt.Errorf("unexpected PEM block %q", block.Type))
	}
	r.SignatureValid, r.OK = true, true
	return r
}

func runX509(args []string) int {
	fs := flag.NewFlagSet("x509", flag.ExitOnError)
	caFile := fs.String("ca", "", "federation CA certificate (PEM)")
	_ = fs.Parse(args)
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "--ca:", err)
		return 2
	}
	block, _ := pem.Decode(caPEM)
	if block == nil {
		fmt.Fprintln(os.Stderr, "--ca: no PEM block")
		return 2
	}
	ca, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		fmt.Fprintln(os.Stderr, "--ca:", err)
		return 2
	}
	rc := 0
	for _, file := range fs.Args() {
		data, err := os.ReadFile(file)
		if err != nil {
			emit(x509Report{File: file, Error: err.Error()})
			rc = 1
			continue
		}
		for {
			var b *pem.Block
			b, data = pem.Decode(data)
			if b == nil {
				break
			}
			r := describe(file, b, ca)
			if !r.OK {
				rc = 1
			}
			emit(r)
		}
	}
	return rc
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: pqfed-interop client|server|x509 [flags]")
		os.Exit(2)
	}
	var rc int
	switch os.Args[1] {
	case "client":
		rc = runClient(os.Args[2:])
	case "server":
		rc = runServer(os.Args[2:])
	case "x509":
		rc = runX509(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q: use client, server or x509\n", os.Args[1])
		rc = 2
	}
	os.Exit(rc)
}
