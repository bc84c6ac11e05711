"""A VMware vCenter simulator (govmomi's vcsim) for tests, built offline from Debian packages.

``running_vcsim()`` builds the simulator if needed (``vcsim/build.sh``: Debian's
``golang-go`` + ``golang-github-vmware-govmomi-dev`` 0.24.2, plus our ``ExportVm`` and
NFC upload/download fixes, cached under ``/var/cache/vmigrate-tests``), starts it on
127.0.0.1 (a free port chosen by the kernel) over HTTPS with a certificate from a
throw-away test CA, waits until it answers, and stops it by PID afterwards.

What the simulator covers: login, inventory (datacenters, clusters, hosts, datastores,
VMs and their devices), PropertyCollector / container views, power operations,
snapshots (create / revert / remove), ``ExportVm`` and ``ResourcePool.ImportVApp`` with
``HttpNfcLease`` device URLs whose bytes really are read from / written to the datastore
file backing each disk, and the datastore ``/folder`` HTTP API.

What it does NOT cover (a driver tested only here can still be wrong about these):

* Disk formats: a VM disk is whatever bytes its backing file holds. ``ExportVm`` serves
  them verbatim (a real vCenter serves a streamOptimized VMDK); an upload is stored
  verbatim (ESXi would convert a streamOptimized upload into a flat disk). There is no
  descriptor / ``-flat.vmdk`` split: the backing file (``disk1.vmdk``) *is* the data.
  Model VMs' disks are empty until written through ``/folder`` (``Vcsim.upload_disk``).
* Snapshots are bookkeeping only: no delta disks (``-000001.vmdk``), backings do not
  change, revert does not restore data, no ``QueryChangedDiskAreas`` / CBT.
* Leases: always ``ready`` at once, never time out, no ``HttpNfcLeaseGetManifest``,
  progress is recorded but unchecked; ``ImportVApp`` device URLs have an empty
  ``sslThumbprint`` (``ExportVm``'s carry the SHA-1 of the server certificate).
* Authorisation: ``/folder`` and ``/nfc`` accept requests without credentials; one
  user/password pair; no roles, permissions or SSO.
* ``CloneVM_Task`` / ``RelocateVM_Task`` give the VM new, empty disk files (no data is
  copied); ``VirtualDiskManager.CopyVirtualDisk_Task`` does copy the bytes.
* Tasks complete synchronously; no task queueing, cancellation or slow progress.
* No guest operations, vMotion / relocate data movement, storage policies or vSAN.
* The inventory model is a vCenter 6.5 (``apiVersion`` 6.5) from govmomi 0.24.2; no
  direct-to-ESXi mode (0.24.2's ESX model hands pyvmomi datastore references it then
  cannot resolve).

Gotchas for a pyvmomi driver (real vCenters behave the same for the first two):

* Lease device URLs are ``https://*/nfc/<lease>/disk-N.vmdk``: replace ``*`` with the
  host (and port) you connected to (``Vcsim.lease_url``). Use the URL as given
  otherwise: the lease id contains ``%5B..%5D``.
* ``ExportVm`` fails with ``InvalidPowerState`` while the VM is powered on.
* ``pyVim.task.WaitForTask`` raises ``TypeError`` on some tasks here (snapshot revert /
  remove, disk copy) because the simulator's ``TaskInfo.entity`` is not a ManagedEntity:
  poll ``info.state`` / ``info.error`` / ``info.result`` through the PropertyCollector
  instead (``wait_for_task``).
* ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` may be set in the environment: pass the CA
  per call and don't let HTTP clients read the environment (``trust_env=False``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlencode, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from pyVmomi import vim

BUILD_SCRIPT = Path(__file__).resolve().parent / "vcsim" / "build.sh"
GOVMOMI_SOURCES = Path("/usr/share/gocode/src/github.com/vmware/govmomi/simulator")
# Debian packages the simulator needs (qemu-utils only for tests making VMDKs).
APT_PACKAGES = ("golang-go", "golang-github-vmware-govmomi-dev", "patch", "qemu-utils")

BUILD_TIMEOUT = 600.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 30.0
_CHUNK = 1 << 20
TASK_PROPS = ("state", "error", "result")


class VcsimError(RuntimeError):
    """The simulator could not be built, started or used."""


def missing_prerequisites() -> list[str]:
    """What this machine lacks to build and run the simulator (empty when ready)."""
    missing = []
    if shutil.which("go") is None:
        missing.append("go (apt-get install golang-go)")
    if shutil.which("patch") is None:
        missing.append("patch (apt-get install patch)")
    if not (GOVMOMI_SOURCES / "http_nfc_lease.go").is_file():
        missing.append("govmomi sources (apt-get install golang-github-vmware-govmomi-dev)")
    return missing


def build_vcsim(timeout: float = BUILD_TIMEOUT) -> Path:
    """Build the simulator unless an up-to-date binary is cached; return its path."""
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise VcsimError(f"vcsim build timed out after {timeout:.0f} s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise VcsimError(f"vcsim build failed ({done.returncode}):\n{done.stderr[-4000:]}")
    binary = Path(lines[-1])
    if not os.access(binary, os.X_OK):
        raise VcsimError(f"vcsim build printed {binary}, which is not an executable")
    return binary


def colon_hex(digest: bytes) -> str:
    """vSphere's thumbprint notation: upper-case hex pairs joined by colons."""
    return ":".join(f"{b:02X}" for b in digest)


@dataclass(frozen=True)
class TestPki:
    """A throw-away CA and a server certificate it signed (PEM files)."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    server_cert: Path
    server_key: Path
    thumbprint: str  # SHA-256 of the server certificate, colon hex
    thumbprint_sha1: str  # SHA-1, as in HttpNfcLease device URLs' sslThumbprint


def make_test_pki(
    directory: Path,
    hosts: Sequence[str] = ("127.0.0.1", "::1", "localhost"),
    name: str = "vmigrate test CA",
) -> TestPki:
    """Create a CA (EC P-256) and a server certificate for ``hosts`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pki = TestPki(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        thumbprint=colon_hex(server.fingerprint(hashes.SHA256())),
        thumbprint_sha1=colon_hex(server.fingerprint(hashes.SHA1())),  # noqa: S303
    )
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    pki.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.server_key.chmod(0o600)
    return pki


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class VcsimOptions:
    """Inventory and login of the simulated vCenter.

    Names follow govmomi's model: datacenters ``DC0``..., datastores ``LocalDS_0``...,
    VMs ``DC0_H0_VM0`` (standalone host) and ``DC0_C0_RP0_VM0`` (cluster pool); every
    model VM has one 1 MiB disk ``[LocalDS_0] <vm>/disk1.vmdk``, powered on.
    """

    username: str = "vmigrate@vsphere.local"
    password: str = "vcsim-Passw0rd!"
    datacenters: int = 1
    clusters: int = 1
    hosts_per_cluster: int = 1
    standalone_hosts: int = 1
    datastores: int = 1
    vms: int = 2  # per resource pool (standalone host and cluster each have one)
    autostart: bool = True

    def args(self) -> list[str]:
        return [
            f"-username={self.username}",
            f"-password={self.password}",
            f"-dc={self.datacenters}",
            f"-cluster={self.clusters}",
            f"-host={self.hosts_per_cluster}",
            f"-standalone-host={self.standalone_hosts}",
            f"-ds={self.datastores}",
            f"-vm={self.vms}",
            f"-autostart={str(self.autostart).lower()}",
        ]


@dataclass(frozen=True)
class Vcsim:
    """A running simulator: where it is, how to trust it, and a few data helpers."""

    url: str  # SDK endpoint, https://127.0.0.1:<port>/sdk
    host: str
    port: int
    username: str
    password: str
    ca_bundle: Path  # PEM of the CA that signed the server certificate
    thumbprint: str  # SHA-256 of the server certificate, colon hex
    thumbprint_sha1: str
    pid: int
    workdir: Path
    log_path: Path
    datacenter: str = "DC0"
    datastore: str = "LocalDS_0"

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context trusting only the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client that verifies against the test CA and ignores the environment."""
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return httpx.Client(verify=self.ssl_context(), trust_env=False, **kwargs)

    def lease_url(self, device_url: str) -> str:
        """An HttpNfcLease device URL with its ``*`` host replaced by this server."""
        parts = urlsplit(device_url)
        if parts.hostname != "*":
            return device_url
        return parts._replace(netloc=f"{self.host}:{self.port}").geturl()

    def folder_url(
        self, path: str, *, datacenter: str | None = None, datastore: str | None = None
    ) -> str:
        """The ``/folder`` URL of ``path`` (relative to the datastore root)."""
        query = urlencode(
            {"dcPath": datacenter or self.datacenter, "dsName": datastore or self.datastore}
        )
        return f"{self.base_url}/folder/{quote(path.lstrip('/'))}?{query}"

    def write_datastore_file(
        self,
        path: str,
        data_path: Path,
        *,
        datacenter: str | None = None,
        datastore: str | None = None,
    ) -> None:
        """PUT the file ``data_path`` to ``path`` on a datastore, streaming it."""
        size = data_path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with data_path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk

        url = self.folder_url(path, datacenter=datacenter, datastore=datastore)
        with self.http_client(auth=(self.username, self.password)) as client:
            response = client.put(
                url,
                content=chunks(),
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            )
        if response.status_code not in (200, 201, 204):
            raise VcsimError(f"PUT {url}: HTTP {response.status_code}")

    def read_datastore_file(
        self, path: str, *, datacenter: str | None = None, datastore: str | None = None
    ) -> bytes:
        """GET a datastore file through ``/folder``. ``path`` may be ``[ds] dir/file``."""
        if path.startswith("["):
            datastore, _, path = path[1:].partition("] ")
        url = self.folder_url(path, datacenter=datacenter, datastore=datastore)
        with self.http_client(auth=(self.username, self.password)) as client:
            response = client.get(url)
        if response.status_code != 200:
            raise VcsimError(f"GET {url}: HTTP {response.status_code}")
        return response.content

    def upload_disk(self, vm_name: str, data_path: Path, disk_index: int = 0) -> str:
        """Put ``data_path``'s bytes into the file backing a VM's disk; return its ``[ds] path``.

        This is how a test gives a VM disk content (the simulator creates them empty);
        ``ExportVm`` then serves exactly these bytes.
        """
        datacenter, datastore_path = self.disk_backing(vm_name, disk_index)
        datastore, _, path = datastore_path[1:].partition("] ")
        self.write_datastore_file(path, data_path, datacenter=datacenter, datastore=datastore)
        return datastore_path

    def disk_backing(self, vm_name: str, disk_index: int = 0) -> tuple[str, str]:
        """(datacenter name, ``[ds] path``) of a VM's ``disk_index``-th virtual disk."""
        from pyVmomi import vim

        with self.connect() as si:
            vm: Any = find_vm(si, vm_name)
            disks: list[Any] = [
                d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
            ]
            if disk_index >= len(disks):
                raise VcsimError(f"{vm_name} has {len(disks)} disk(s), no #{disk_index}")
            entity: Any = vm
            while entity is not None and not isinstance(entity, vim.Datacenter):
                entity = entity.parent
            if entity is None:
                raise VcsimError(f"{vm_name} is in no datacenter")
            return str(entity.name), str(disks[disk_index].backing.fileName)

    @contextlib.contextmanager
    def connect(self) -> Iterator[vim.ServiceInstance]:
        """A pyvmomi session, TLS-verified against the test CA; logged out on exit."""
        from pyVim import connect

        smart_connect = cast(Any, connect.SmartConnect)
        si = smart_connect(
            host=self.host,
            port=self.port,
            user=self.username,
            pwd=self.password,
            sslContext=self.ssl_context(),
            httpConnectionTimeout=HTTP_TIMEOUT,
        )
        try:
            yield cast("vim.ServiceInstance", si)
        finally:
            cast(Any, connect.Disconnect)(si)


def find_vm(si: vim.ServiceInstance, name: str) -> vim.VirtualMachine:
    """The VM called ``name`` anywhere in the inventory."""
    from pyVmomi import vim

    content: Any = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        for vm in view.view:
            if vm.name == name:
                return cast("vim.VirtualMachine", vm)
    finally:
        view.Destroy()
    raise VcsimError(f"no VM named {name!r}")


def wait_for_task(si: vim.ServiceInstance, task: vim.Task, timeout: float = 30.0) -> Any:
    """Wait for a task by polling ``info.state`` / ``info.error`` / ``info.result``.

    Unlike ``pyVim.task.WaitForTask`` this never fetches the whole ``TaskInfo``, which
    pyvmomi fails to decode for some simulator tasks (snapshot revert / remove: their
    ``entity`` is a snapshot). Returns ``info.result``; raises the task's fault.
    """
    from pyVmomi import vmodl

    content: Any = si.RetrieveContent()
    pc: Any = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=task)],
        propSet=[pc.PropertySpec(type=type(task), pathSet=[f"info.{p}" for p in TASK_PROPS])],
    )
    deadline = time.monotonic() + timeout
    while True:
        props: dict[str, Any] = {}
        for obj in content.propertyCollector.RetrieveContents([spec]):
            props.update({p.name: p.val for p in obj.propSet})
        state = props.get("info.state")
        if state == "success":
            return props.get("info.result")
        if state == "error":
            error = props.get("info.error")
            raise error if isinstance(error, BaseException) else VcsimError(f"task failed: {error}")
        if time.monotonic() > deadline:
            raise VcsimError(f"task {task} still {state} after {timeout:.0f} s")
        time.sleep(0.05)


@contextlib.contextmanager
def running_vcsim(
    options: VcsimOptions | None = None, *, binary: Path | None = None
) -> Iterator[Vcsim]:
    """Build (if needed), start, yield and finally stop a simulator on 127.0.0.1."""
    options = options or VcsimOptions()
    missing = missing_prerequisites()
    if binary is None and missing:
        raise VcsimError("cannot build vcsim, missing: " + ", ".join(missing))
    binary = binary or build_vcsim()

    workdir = Path(tempfile.mkdtemp(prefix="vmigrate-vcsim-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        pki = make_test_pki(workdir / "pki")
        datastores = workdir / "datastores"  # the model's temp datastore dirs land here
        datastores.mkdir()
        ready_file = workdir / "ready.json"
        log_path = workdir / "vcsim.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GOVC_")}
        env["TMPDIR"] = str(datastores)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    str(binary),
                    "-l=127.0.0.1:0",
                    f"-tlscert={pki.server_cert}",
                    f"-tlskey={pki.server_key}",
                    f"-ready-file={ready_file}",
                    "-exit-on-stdin-eof",  # no orphan if this process is killed
                    *options.args(),
                ],
                stdin=subprocess.PIPE,  # held open until _stop()
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )
        url = _wait_ready(process, ready_file, log_path, pki.ca_cert)
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        yield Vcsim(
            url=url,
            host=parts.hostname,
            port=parts.port,
            username=options.username,
            password=options.password,
            ca_bundle=pki.ca_cert,
            thumbprint=pki.thumbprint,
            thumbprint_sha1=pki.thumbprint_sha1,
            pid=process.pid,
            workdir=workdir,
            log_path=log_path,
        )
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(
    process: subprocess.Popen[bytes], ready_file: Path, log_path: Path, ca: Path
) -> str:
    """Bounded wait for the ready file, then for a TLS-verified answer from /about."""
    deadline = time.monotonic() + START_TIMEOUT
    context = ssl.create_default_context(cafile=str(ca))
    url: str | None = None
    last_error: Exception | None = None
    with httpx.Client(verify=context, trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise VcsimError(f"vcsim exited with {process.returncode}:\n{_tail(log_path)}")
            if url is None and ready_file.exists():
                url = str(json.loads(ready_file.read_text())["url"])
            if url is not None:
                try:
                    if client.get(url.removesuffix("/sdk") + "/about").status_code == 200:
                        return url
                except httpx.HTTPError as exc:
                    last_error = exc
            time.sleep(0.05)
    raise VcsimError(
        f"vcsim not ready after {START_TIMEOUT:.0f} s ({last_error}):\n{_tail(log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (vcsim then removes its datastores), SIGKILL if it lingers; by PID only."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    if process.stdin is not None:
        process.stdin.close()


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""
