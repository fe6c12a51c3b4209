// Command probe fetches one URL the way an in-cluster client does: over TLS
// verified against a CA file, with a bearer token read from a file (a pod's
// service-account token), and prints the response body. The real node's test
// image carries it next to busybox, whose wget cannot verify certificates and
// cannot negotiate TLS with an ECDSA-keyed kube-apiserver.
//
//	probe [-ca FILE] [-token FILE] [-timeout 10s] URL
//
// Exit status: 0 for a 2xx answer, 1 otherwise (the status line goes to stderr).
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	caFile := flag.String("ca", "", "PEM CA bundle to verify the server with (default: system roots)")
	tokenFile := flag.String("token", "", "file whose content is sent as 'Authorization: Bearer ...'")
	timeout := flag.Duration("timeout", 10*time.Second, "whole-request timeout")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: probe [-ca FILE] [-token FILE] [-timeout 10s] URL")
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *caFile, *tokenFile, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}

func run(url, caFile, tokenFile string, timeout time.Duration) error {
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return fmt.Errorf("-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("-ca: no PEM certificate in %s", caFile)
		}
		tlsConfig.RootCAs = pool
	}
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if tokenFile != "" {
		token, err := os.ReadFile(tokenFile)
		if err != nil {
			return fmt.Errorf("-token: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	}
	httpClient := &http.Client{Timeout: timeout, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
	resp, err := httpClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(os.Stdout, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s: HTTP %s", url, resp.Status)
	}
	return nil
}
