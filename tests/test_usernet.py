"""User-mode networking with a real guest: the default Linux guest (Debian's cloud
kernel, busybox) on the translator, booted once for the module with two user NICs
and driven over its serial console:

  eth0  --net user,hostfwd=tcp (x2),hostfwd=udp,hostname=,dns=,guestfwd=   (10.0.2.0/24)
  eth1  --net user,net=10.0.3.0/24,restrict=on,ipv6=off,hostname=,hostfwd=...  (the restricted one)

udhcpc gets 10.0.2.15 (and the hostname and DNS server the options name); wget
fetches a file from a Python HTTP server on the host's 127.0.0.1 through 10.0.2.2;
host clients reach guest ``nc -l`` listeners through both TCP hostfwds (data both
ways) and UDP datagrams reach the guest's stack; restrict=on refuses the guest's
outbound connection while its hostfwd still works; DNS is relayed (to a
responder on 127.0.0.1:53) at the address dns= names; HMP ``info usernet`` and ``hostfwd_add``/``hostfwd_remove``
work on the running VM. When the tests run as root the VM is started as nobody
(setpriv; ``--runas nobody`` where no interpreter nobody may run has kvmpy's
dependencies): no part of it ever runs as root. All traffic stays on loopback.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import ROOT
from support.dns import LoopbackDns, port_53_busy
from support.serial_shell import booted_shell


pytestmark = pytest.mark.xdist_group("usernet-guest")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOBODY_UID = NOBODY_GID = 65534
ETH0_HOSTNAME = "kvmpy-eth0-guest"
ETH1_HOSTNAME = "kvmpy-eth1-guest"
ETH0_DNS = "10.0.2.53"       # dns=: not QEMU's 10.0.2.3, so the option shows
GUEST_UDP_PORT = 7777


def _unprivileged_python() -> tuple[str, str | None]:
    """(interpreter, how the VM drops root): as root, "setpriv" starts the VM as nobody
    with an interpreter nobody can run (this one, else Debian's /usr/bin/python3 when it
    has what kvmpy needs), "runas" falls back to --runas nobody; not root, None: the VM
    already runs unprivileged."""
    if os.geteuid() != 0:
        return sys.executable, None
    if shutil.which("setpriv"):
        for python in dict.fromkeys((sys.executable, "/usr/bin/python3")):
            probe = subprocess.run(["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_GID}", "--clear-groups",
                                    python, "-c", "import kvmpy.net.slirp"], cwd=ROOT, capture_output=True,
                                   env=dict(os.environ, PYTHONPATH=ROOT))
            if probe.returncode == 0:
                return python, "setpriv"
    return sys.executable, "runas"


class GuestFwdServer(threading.Thread):
    """The host end of a guestfwd: kvmpy connects once at start; whatever arrives is
    kept, and each line is answered with ``echo:`` and the line."""

    def __init__(self, listener: socket.socket) -> None:
        super().__init__(daemon=True)
        self.listener = listener
        self.received = b""

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            pending = b""
            while chunk := conn.recv(4096):
                self.received += chunk
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    conn.sendall(b"echo:" + line + b"\n")


class UserNetGuest:
    def __init__(self, shell, proc, hmp_path, ports, payload, http_port, runas, dns) -> None:
        self.shell, self.proc, self.hmp_path = shell, proc, hmp_path
        self.ports, self.payload, self.http_port, self.runas, self.dns = ports, payload, http_port, runas, dns

    def hmp(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.hmp_path)
            s.settimeout(30)
            s.sendall(command.encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode(errors="replace")


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from kvmpy.tools import guestbuild
    if not all(map(shutil.which, ("apt-get", "dpkg-deb"))):
        pytest.skip("not a Debian host: no apt-get/dpkg-deb to build the guest")
    try:
        import kvmpy.net.slirp  # noqa: F401
    except ImportError as e:
        pytest.skip(f"kvmpy.net._slirp_cffi is not built ({e}): apt-get install libslirp-dev, rebuild")
    tmp = tmp_path_factory.mktemp("usernet")
    built = guestbuild.build(out_dir=str(tmp / "guest"), with_disk=False)

    www = tmp / "www"
    www.mkdir()
    payload = os.urandom(96 << 10).hex().encode()       # 192 KiB: many TCP segments
    (www / "file").write_bytes(payload)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    dns = None
    try:
        dns_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns_sock.bind(("127.0.0.1", 53))
        dns = LoopbackDns(dns_sock)
        dns.start()
    except OSError as e:
        dns = port_53_busy(e)

    ports = {"eth0": _free_port(), "eth0_second": _free_port(), "eth0_udp": _free_udp_port(),
             "eth1": _free_port(), "added": _free_port()}
    # guestfwd: the guest's connections to 10.0.2.100:1234 reach this host listener.
    fwd_listener = socket.socket()
    fwd_listener.bind(("127.0.0.1", 0))
    fwd_listener.listen(1)
    guestfwd = GuestFwdServer(fwd_listener)
    guestfwd.start()
    # What the VM process opens lives where an unprivileged user may read it (and
    # make its monitor sockets): pytest's own temporary directories are root's alone.
    vm_dir = tempfile.mkdtemp(prefix="kvmpy-usernet-")
    os.chmod(vm_dir, 0o755)
    kernel, initrd = shutil.copy(built.kernel, vm_dir), shutil.copy(built.initrd, vm_dir)
    sock_dir = os.path.join(vm_dir, "sockets")
    os.mkdir(sock_dir, 0o700)
    hmp_path = os.path.join(sock_dir, "hmp.sock")
    qmp_path = os.path.join(sock_dir, "qmp.sock")
    python, runas = _unprivileged_python()
    if runas == "setpriv":
        os.chown(sock_dir, NOBODY_UID, NOBODY_GID)
    argv = [python, "-m", "kvmpy", "run", "--accel", "tcg", "-m", "256",
            "--kernel", kernel, "--initrd", initrd, "--no-reboot",
            "--append", "console=ttyS0 panic=-1 quiet",
            "--net", f"user,hostfwd=tcp:127.0.0.1:{ports['eth0']}-:22,"
                     f"hostfwd=tcp:127.0.0.1:{ports['eth0_second']}-:24,"
                     f"hostfwd=udp:127.0.0.1:{ports['eth0_udp']}-:{GUEST_UDP_PORT},hostname={ETH0_HOSTNAME},"
                     f"dns={ETH0_DNS},"
                     f"guestfwd=tcp:10.0.2.100:1234-tcp:127.0.0.1:{fwd_listener.getsockname()[1]}",
            "--net", f"user,net=10.0.3.0/24,restrict=on,ipv6=off,hostname={ETH1_HOSTNAME},"
                     f"hostfwd=tcp:127.0.0.1:{ports['eth1']}-:23",
            "--monitor", f"unix:{hmp_path}", "--qmp", f"unix:{qmp_path}"]
    if runas == "setpriv":
        # Started as nobody, never root: what a user without privileges runs.
        argv = ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_GID}", "--clear-groups", *argv]
    elif runas == "runas":
        argv += ["--runas", "nobody"]
    resolv_conf = os.path.join(vm_dir, "resolv.conf")
    with open(resolv_conf, "w") as f:
        f.write("nameserver 127.0.0.1\n")     # the responder above: DNS stays on loopback
    os.chmod(resolv_conf, 0o644)
    env = dict(os.environ, PYTHONPATH=ROOT, KVMPY_RESOLV_CONF=resolv_conf)
    try:
        with booted_shell(argv, vm_dir, env) as shell:
            g = UserNetGuest(shell, shell.proc, hmp_path, ports, payload, httpd.server_address[1], runas, dns)
            g.guestfwd = guestfwd
            g.qmp_path = qmp_path
            yield g
    finally:
        httpd.shutdown()
        fwd_listener.close()
        if isinstance(dns, LoopbackDns):
            dns.stop()
        shutil.rmtree(vm_dir, ignore_errors=True)


def _dhcp(guest, ifname: str) -> str:
    rc, out = guest.shell.run(f"ip link set {ifname} up; udhcpc -i {ifname} -q -n -t 5 "
                              "-s /etc/kvmpy/udhcpc.script")
    assert rc == 0, out
    return out


@pytest.fixture(scope="module")
def configured(guest):
    """eth1 first, eth0 last: the last lease sets the default route and resolv.conf."""
    out1 = _dhcp(guest, "eth1")
    out0 = _dhcp(guest, "eth0")
    return out0, out1


def test_the_vm_runs_unprivileged_and_sandboxed(guest):
    """Every other test here then shows libslirp working as nobody, under seccomp:
    started as nobody (setpriv) where the test is root, never root at all."""
    from kvmpy.sandbox import unavailable_reason
    status = open(f"/proc/{guest.proc.pid}/status").read()
    if unavailable_reason() is None:
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status
    if not guest.runas:
        pytest.skip("not root: the test runs kvmpy as this (unprivileged) user already")
    uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M)
    assert uid and uid.groups() == (str(NOBODY_UID),) * 3, status
    if guest.runas == "runas":
        pytest.skip("no interpreter nobody can run kvmpy with: the VM dropped root by --runas instead")


def test_dhcp_gives_qemus_addresses(guest, configured):
    out0, out1 = configured
    assert "lease of 10.0.2.15 obtained from 10.0.2.2" in out0, out0
    assert "lease of 10.0.3.15 obtained from 10.0.3.2" in out1, out1
    rc, out = guest.shell.run("ip -4 addr show eth0; ip route")
    assert "inet 10.0.2.15/24" in out and "default via 10.0.2.2" in out, out


def test_ipv6_slaac_and_the_virtual_host(guest, configured):
    """libslirp's router advertisements (fec0::/64) give eth0 an address; eth1 has ipv6=off."""
    # The guest's udhcpc script flushed every address of the NICs, IPv6 too: IPv6 off
    # and on again makes a new link-local address and a router solicitation.
    guest.shell.run("for i in eth0 eth1; do echo 1 > /proc/sys/net/ipv6/conf/$i/disable_ipv6; "
                    "echo 0 > /proc/sys/net/ipv6/conf/$i/disable_ipv6; done")
    deadline = time.monotonic() + 60
    while True:
        rc, out = guest.shell.run("ip -6 addr show eth0; ip -6 addr show eth1")
        eth0, _, eth1 = out.partition("eth1:")
        if "inet6 fec0::" in eth0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert "inet6 fec0::" in eth0 and "fec0::" not in eth1, out
    rc, out = guest.shell.run("ping -c 2 fec0::2")
    assert rc == 0 and "2 packets received" in out, out


def test_wget_from_the_hosts_loopback(guest, configured):
    rc, out = guest.shell.run(f"wget -q -O - http://10.0.2.2:{guest.http_port}/file | md5sum")
    assert rc == 0, out
    assert hashlib.md5(guest.payload).hexdigest() in out, out


def _through_hostfwd(guest, ifname: str, host_port: int, guest_port: int) -> None:
    """A guest ``nc -l`` and a host client on 127.0.0.1:host_port talk both ways."""
    token = os.urandom(8).hex()
    guest.shell.run(f"echo from-guest-{token} > /tmp/send; rm -f /tmp/got; "
                    f"(nc -l -p {guest_port} < /tmp/send > /tmp/got; echo nc-{guest_port}-exit=$?) & true")
    received = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # Until the guest's nc listens, libslirp accepts and then closes the connection.
        with socket.create_connection(("127.0.0.1", host_port), timeout=30) as c:
            c.settimeout(30)
            try:
                received = c.recv(4096)
            except (ConnectionResetError, socket.timeout):
                received = b""
            if received:
                c.sendall(f"from-host-{token}\n".encode())
                c.shutdown(socket.SHUT_WR)
                try:
                    while c.recv(4096):
                        pass
                except (ConnectionResetError, socket.timeout):
                    pass
                break
        time.sleep(1)
    assert received.strip() == f"from-guest-{token}".encode(), received
    guest.shell.wait_for(rf"nc-{guest_port}-exit=\d+".encode(), 60)
    rc, out = guest.shell.run("cat /tmp/got")
    assert f"from-host-{token}" in out, out


def test_hostfwd_into_a_guest_listener(guest, configured):
    _through_hostfwd(guest, "eth0", guest.ports["eth0"], 22)


def test_restrict_blocks_outbound_but_not_hostfwd(guest, configured):
    # (timeout, not wget -T: Debian's busybox 1.35 wget crashes with -T, on the host too)
    rc, out = guest.shell.run(f"timeout 10 wget -q -O - http://10.0.3.2:{guest.http_port}/file | md5sum; "
                              f"timeout 10 wget -q -O - http://10.0.3.2:{guest.http_port}/file > /dev/null")
    assert rc != 0, out
    assert hashlib.md5(guest.payload).hexdigest() not in out
    # The same server through the unrestricted NIC still answers: the refusal is restrict's.
    rc, out = guest.shell.run(f"timeout 30 wget -q -O - http://10.0.2.2:{guest.http_port}/file > /dev/null")
    assert rc == 0, out
    _through_hostfwd(guest, "eth1", guest.ports["eth1"], 23)


def test_dns_at_the_dns_address(guest, configured):
    """The guest's resolver (dns=10.0.2.53, from DHCP) relays to the resolv.conf's first
    nameserver, read before the sandbox; here a responder on 127.0.0.1:53
    (KVMPY_RESOLV_CONF), so the test's traffic stays on loopback."""
    if isinstance(guest.dns, str):
        pytest.skip(guest.dns)
    rc, out = guest.shell.run("cat /etc/resolv.conf; nslookup kvmpy-test.example")
    assert f"nameserver {ETH0_DNS}" in out, out
    assert rc == 0 and LoopbackDns.ADDRESS in out, out
    assert guest.dns.queries >= 1


def test_qmp_reaches_hostfwd_through_human_monitor_command(guest, configured):
    """QEMU 7.2 has no QMP hostfwd command: management tools use human-monitor-command."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    qmp = QEMUMonitorProtocol(guest.qmp_path)
    qmp.connect()
    try:
        port = _free_port()
        hmp = lambda line: qmp.cmd_obj({"execute": "human-monitor-command",  # noqa: E731
                                        "arguments": {"command-line": line}})["return"]
        assert hmp(f"hostfwd_add net0 udp:127.0.0.1:{port}-:5353") == ""
        assert re.search(rf"UDP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+{port}\s", hmp("info usernet"))
        assert "removed" in hmp(f"hostfwd_remove net0 udp:127.0.0.1:{port}")
    finally:
        qmp.close()


def test_guestfwd_to_a_host_address(guest, configured):
    token = os.urandom(6).hex()
    rc, out = guest.shell.run(f"(echo line-{token}; sleep 3) | timeout 20 nc 10.0.2.100 1234")
    assert f"line-{token}".encode() in guest.guestfwd.received, (out, guest.guestfwd.received)
    assert f"echo:line-{token}" in out, out


def test_monitor_info_usernet_and_hostfwd_add_remove(guest, configured):
    info = guest.hmp("info usernet")
    assert "Hub -1 (net0):" in info and "Hub -1 (net1):" in info, info
    assert re.search(rf"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+{guest.ports['eth0']}\s+10\.0\.2\.15\s+22", info), info
    net = guest.hmp("info network")
    assert "net0: index=0,type=user,net=10.0.2.0/24,restrict=off" in net, net
    assert "net1: index=1,type=user,net=10.0.3.0/24,restrict=on" in net, net
    port = guest.ports["added"]
    out = guest.hmp(f"hostfwd_add net0 tcp:127.0.0.1:{port}-:2323")
    assert "could not" not in out and "rror" not in out, out
    assert f"127.0.0.1 {port}" in " ".join(guest.hmp("info usernet").split())
    # Bound after --runas dropped root (when root): an unprivileged process's socket.
    _through_hostfwd(guest, "eth0", port, 2323)
    assert "could not set up host forwarding rule" in guest.hmp(f"hostfwd_add net0 tcp:127.0.0.1:{port}-:2323")
    assert f"host forwarding rule for tcp:127.0.0.1:{port} removed" in \
        guest.hmp(f"hostfwd_remove net0 tcp:127.0.0.1:{port}")
    assert "not found" in guest.hmp(f"hostfwd_remove net0 tcp:127.0.0.1:{port}")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "unknown netdev 'net7'" in guest.hmp("hostfwd_add net7 tcp::1-:2")
    assert "several user networks" in guest.hmp("hostfwd_add tcp::1-:2")


def test_dhcp_hands_out_hostname_and_dns_options(guest, configured):
    """hostname= and dns= reach the guest in the DHCP lease (options 12 and 6); a
    script that only prints keeps the addresses the earlier lease set."""
    guest.shell.run("printf '#!/bin/sh\\n[ \"$1\" = bound ] && echo lease-$interface ip=$ip hostname=$hostname "
                    "dns=$dns\\n' > /tmp/show-lease; chmod +x /tmp/show-lease")
    leases = {}
    for ifname in ("eth1", "eth0"):
        rc, out = guest.shell.run(f"udhcpc -i {ifname} -q -n -t 5 -s /tmp/show-lease")
        assert rc == 0, out
        m = re.search(rf"lease-{ifname} ip=(\S*) hostname=(\S*) dns=(.*)", out)
        assert m, out
        leases[ifname] = m.groups()
    assert leases["eth0"] == ("10.0.2.15", ETH0_HOSTNAME, ETH0_DNS), leases
    # restrict=on: libslirp names no DNS server (as in QEMU), the guest may reach none
    assert leases["eth1"] == ("10.0.3.15", ETH1_HOSTNAME, ""), leases


def test_several_hostfwds_on_one_nic(guest, configured):
    """eth0's second TCP rule, beside the first: each reaches its own guest port."""
    _through_hostfwd(guest, "eth0", guest.ports["eth0_second"], 24)


def _udp_datagrams_seen(guest) -> int:
    """The guest kernel's count of UDP datagrams that arrived (delivered, or to a
    port nobody listens on: busybox has no UDP server)."""
    rc, out = guest.shell.run("cat /proc/net/snmp")
    names, values = [line.split()[1:] for line in out.splitlines() if line.startswith("Udp:")][:2]
    counts = dict(zip(names, map(int, values)))
    return counts["InDatagrams"] + counts["NoPorts"]


def test_udp_hostfwd_delivers_datagrams(guest, configured):
    before = _udp_datagrams_seen(guest)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(5):
            s.sendto(b"kvmpy-udp-%d" % i, ("127.0.0.1", guest.ports["eth0_udp"]))
            time.sleep(0.2)
    deadline = time.monotonic() + 60
    while (seen := _udp_datagrams_seen(guest) - before) < 5 and time.monotonic() < deadline:
        time.sleep(1)
    assert seen >= 5, seen
    # Without the rule the host port is closed and nothing reaches the guest.
    assert "removed" in guest.hmp(f"hostfwd_remove net0 udp:127.0.0.1:{guest.ports['eth0_udp']}")
    before = _udp_datagrams_seen(guest)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(5):
            s.sendto(b"kvmpy-udp-late", ("127.0.0.1", guest.ports["eth0_udp"]))
    time.sleep(3)
    assert _udp_datagrams_seen(guest) - before == 0
