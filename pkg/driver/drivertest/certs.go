package drivertest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
)

// Certs are PEM files for the agent connection, made in a test's
// temporary directory: one CA, the agent's server certificate, the
// controller's client certificate, and two that must be refused: one from
// the same CA issued to another name, one issued to the controller's name
// by another CA.
type Certs struct {
	Agent, Controller driver.TLSFiles
	// WrongName: signed by the CA, CN and DNS SAN "someone-else".
	WrongName driver.TLSFiles
	// OtherCA: the controller's name, signed by an unrelated CA.
	OtherCA driver.TLSFiles
}

type issuer struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// MakeCerts writes a fresh set of certificates (ECDSA P-256) under dir.
func MakeCerts(t testing.TB, dir string) Certs {
	t.Helper()
	ca := newCA(t, "qcow2-csi test CA")
	other := newCA(t, "unrelated CA")
	caFile := filepath.Join(dir, "ca.crt")
	writePEM(t, caFile, "CERTIFICATE", ca.cert.Raw)
	leaf := func(name string, iss issuer, server bool) driver.TLSFiles {
		f := driver.TLSFiles{CA: caFile, Cert: filepath.Join(dir, name+".crt"), Key: filepath.Join(dir, name+".key")}
		issue(t, iss, name, server, f)
		return f
	}
	c := Certs{
		Agent:      leaf(driver.DefaultAgentServerName, ca, true),
		Controller: leaf(driver.DefaultAgentClientName, ca, false),
		WrongName:  leaf("someone-else", ca, false),
	}
	c.OtherCA = driver.TLSFiles{CA: caFile, Cert: filepath.Join(dir, "other-ca.crt"), Key: filepath.Join(dir, "other-ca.key")}
	issue(t, other, driver.DefaultAgentClientName, false, c.OtherCA)
	return c
}

func newCA(t testing.TB, cn string) issuer {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return issuer{cert, key}
}

var serial int64 = 1

func issue(t testing.TB, iss issuer, name string, server bool, f driver.TLSFiles) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	usage := x509.ExtKeyUsageClientAuth
	if server {
		usage = x509.ExtKeyUsageServerAuth
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, iss.cert, &key.PublicKey, iss.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, f.Cert, "CERTIFICATE", der)
	writePEM(t, f.Key, "EC PRIVATE KEY", kder)
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
