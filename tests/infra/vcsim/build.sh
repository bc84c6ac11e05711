#!/usr/bin/env bash
# Build the vmigrate-vcsim test simulator offline from Debian's packages and
# print the path of the (cached) binary on stdout; logs go to stderr.
#
#   needs: golang-go, golang-github-vmware-govmomi-dev, patch (apt)
#   cache: ${VMIGRATE_TEST_CACHE:-/var/cache/vmigrate-tests}/vcsim-<key>/vmigrate-vcsim
#          <key> = sha256 of this directory's sources + govmomi package version
#          + go version, so any change rebuilds.
#
# govmomi's simulator package is copied into a temporary GOPATH overlay that
# comes before /usr/share/gocode (which is never modified); there patches/*.patch
# are applied (stock ServeNFC renamed away, Fetch of unset properties fixed) and
# simulator/*.go from here is added (ExportVm, working NFC upload/download).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
gocode=/usr/share/gocode
govmomi=$gocode/src/github.com/vmware/govmomi

command -v go >/dev/null || { echo "build.sh: go not found (apt-get install golang-go)" >&2; exit 2; }
command -v patch >/dev/null || { echo "build.sh: patch not found (apt-get install patch)" >&2; exit 2; }
pkgver=$(dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev 2>/dev/null) || {
    echo "build.sh: apt-get install golang-github-vmware-govmomi-dev" >&2; exit 2; }
[ -f "$govmomi/simulator/http_nfc_lease.go" ] || { echo "build.sh: $govmomi/simulator missing" >&2; exit 2; }

key=$( { cd "$here" && cat build.sh main.go simulator/*.go patches/*.patch; echo "$pkgver"; go version; } \
       | sha256sum | cut -c1-16)

cache=${VMIGRATE_TEST_CACHE:-/var/cache/vmigrate-tests}
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/vmigrate-tests
    mkdir -p "$cache"
fi
out=$cache/vcsim-$key/vmigrate-vcsim
if [ -x "$out" ]; then echo "$out"; exit 0; fi

# Serialize concurrent builds (e.g. parallel test sessions).
exec 9>"$cache/vcsim-build.lock"
flock -w 300 9 || { echo "build.sh: timed out waiting for $cache/vcsim-build.lock" >&2; exit 1; }
if [ -x "$out" ]; then echo "$out"; exit 0; fi

overlay=$(mktemp -d "${TMPDIR:-/tmp}/vmigrate-vcsim-gopath.XXXXXX")
trap 'rm -rf "$overlay"' EXIT
sim=$overlay/src/github.com/vmware/govmomi/simulator
mkdir -p "$(dirname "$sim")" "$overlay/src/vmigrate-vcsim"
# GOPATH mode takes the first root holding a package's directory, so the whole
# govmomi tree must be visible in the overlay: symlink all but simulator/.
for entry in "$govmomi"/*; do
    [ "$(basename "$entry")" = simulator ] || ln -s "$entry" "$(dirname "$sim")/"
done
cp -r "$govmomi/simulator" "$sim"
find "$sim" -name '*_test.go' -delete

# Patches (unified diffs against govmomi 0.24.2), then our added files.
for p in "$here"/patches/*.patch; do
    patch --quiet --forward --no-backup-if-mismatch -d "$(dirname "$sim")" -p1 <"$p" >&2 || {
        echo "build.sh: $(basename "$p") does not apply to govmomi $pkgver" >&2; exit 1; }
done
if grep -q 'ExportVm(' "$sim"/*.go; then
    echo "build.sh: this govmomi already has ExportVm; revisit simulator/export.go" >&2; exit 1
fi
cp "$here"/simulator/*.go "$sim/"
cp "$here/main.go" "$overlay/src/vmigrate-vcsim/"

mkdir -p "$(dirname "$out")"
echo "build.sh: building $out (govmomi $pkgver, $(go version | cut -d' ' -f3))" >&2
(
    cd "$overlay/src/vmigrate-vcsim"
    GOPATH="$overlay:$gocode" GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0 \
        GOCACHE="$cache/vcsim.go-build" \
        go build -o "$out.tmp" .
)
mv -f "$out.tmp" "$out"
# Drop binaries of older sources (a running one keeps its inode).
find "$cache" -mindepth 1 -maxdepth 1 -type d -name 'vcsim-*' ! -name "vcsim-$key" \
    -exec rm -rf {} + 2>/dev/null || true
echo "$out"
