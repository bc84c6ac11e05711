// vmigrate test extension, compiled INTO a private copy of govmomi 0.24.2's
// simulator package by ../build.sh, after ../patches/0001 renamed the stock
// ServeNFC (http_nfc_lease.go) so that this one is registered under /nfc/.
//
// Fixes over the stock handler:
//   - GET crashed (io.Copy into a nil writer); now GET/HEAD serve the file
//     with http.ServeContent (Content-Length, Range requests, HEAD).
//   - PUT/POST discarded the bytes; now they replace the datastore file the
//     lease maps the device URL to (the imported VM's disk backing file),
//     byte for byte: a streamOptimized VMDK is stored as uploaded, not
//     converted to a flat disk as ESXi would.

package simulator

import (
	"io"
	"log"
	"net/http"
	"os"
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

// ServeNFC handles NFC lease file upload/download (token based: no session).
func ServeNFC(w http.ResponseWriter, r *http.Request) {
	p := strings.Split(r.URL.Path, "/") // /nfc/<lease id>/<file name>
	if len(p) < 2 {
		http.NotFound(w, r)
		return
	}
	id, name := p[len(p)-2], p[len(p)-1]
	l, ok := nfcLease.Load(types.ManagedObjectReference{Type: "HttpNfcLease", Value: id})
	if !ok {
		log.Printf("invalid NFC lease: %s", id)
		http.NotFound(w, r)
		return
	}
	file, ok := l.(*HttpNfcLease).files[name]
	if !ok {
		log.Printf("invalid NFC device id: %s", name)
		http.NotFound(w, r)
		return
	}

	switch r.Method {
	case http.MethodGet, http.MethodHead:
		f, err := os.Open(file)
		if err != nil {
			http.NotFound(w, r)
			return
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, name, st.ModTime(), f)
		log.Printf("nfc %s %s: %d bytes", r.Method, file, st.Size())
	case http.MethodPut, http.MethodPost:
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		n, err := io.Copy(f, r.Body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			log.Printf("nfc %s %s: %s", r.Method, file, err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		log.Printf("nfc %s %s: %d bytes", r.Method, file, n)
		w.WriteHeader(http.StatusOK)
	default:
		w.Header().Set("Allow", "GET, HEAD, PUT, POST")
		w.WriteHeader(http.StatusMethodNotAllowed)
	}
}
