// vmigrate-vcsim: a minimal vcsim launcher for vmigrate's tests.
//
// Debian ships govmomi's simulator library but not the vcsim command, so this
// is our own small main. It builds an inventory model, serves it over HTTPS
// with the given certificate, writes a JSON ready file once it is listening,
// and shuts down cleanly (removing its temporary datastores) on SIGTERM/SIGINT
// or, with -exit-on-stdin-eof, when its parent dies and stdin closes.
//
// Built by build.sh against a private copy of the simulator package that also
// contains simulator/export.go and simulator/nfc.go.
package main

import (
	"crypto/sha1" // #nosec: vSphere sslThumbprint fields are SHA-1 by definition
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address (port 0: pick a free port)")
	certFile := flag.String("tlscert", "", "PEM server certificate (chain) file (required)")
	keyFile := flag.String("tlskey", "", "PEM server private key file (required)")
	username := flag.String("username", "user", "login user name")
	password := flag.String("password", "pass", "login password")
	readyFile := flag.String("ready-file", "", "write {\"url\",\"pid\",...} JSON here once serving")
	dc := flag.Int("dc", 1, "datacenters")
	cluster := flag.Int("cluster", 1, "clusters per datacenter")
	host := flag.Int("host", 3, "hosts per cluster")
	standalone := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	ds := flag.Int("ds", 1, "datastores")
	vm := flag.Int("vm", 2, "VMs per resource pool")
	autostart := flag.Bool("autostart", true, "power on the model's VMs")
	watchStdin := flag.Bool("exit-on-stdin-eof", false, "also shut down when stdin closes (parent died)")
	flag.Parse()

	if *certFile == "" || *keyFile == "" {
		log.Fatal("-tlscert and -tlskey are required")
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatalf("loading TLS key pair: %s", err)
	}
	sum := sha1.Sum(cert.Certificate[0]) // #nosec G401
	simulator.NfcSslThumbprint = strings.ToUpper(strings.Join(splitHex(sum[:]), ":"))

	model := simulator.VPX() // a vCenter; govmomi 0.24.2's ESX() model breaks pyvmomi
	model.Datacenter = *dc
	model.Cluster = *cluster
	model.ClusterHost = *host
	model.Host = *standalone
	model.Datastore = *ds
	model.Machine = *vm
	model.Autostart = *autostart
	if err := model.Create(); err != nil {
		log.Fatalf("creating model: %s", err)
	}

	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	server := model.Service.NewServer()

	u := *server.URL
	u.User = nil
	ready, _ := json.Marshal(map[string]interface{}{
		"url":      u.String(),
		"pid":      os.Getpid(),
		"username": *username,
	})
	fmt.Println(string(ready))
	if *readyFile != "" {
		// Write then rename so that readers never see a partial file.
		tmp := *readyFile + ".tmp"
		if err := os.WriteFile(tmp, ready, 0o600); err != nil {
			log.Fatal(err)
		}
		if err := os.Rename(tmp, *readyFile); err != nil {
			log.Fatal(err)
		}
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	if *watchStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin) // returns at EOF: the parent is gone
			sig <- syscall.SIGTERM
		}()
	}
	<-sig
	server.Close()
	model.Remove() // deletes the temporary datastore directories
}

func splitHex(b []byte) []string {
	s := make([]string, len(b))
	for i, c := range b {
		s[i] = fmt.Sprintf("%02x", c)
	}
	return s
}
