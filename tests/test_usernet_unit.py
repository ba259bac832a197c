"""User-mode networking without a guest: QEMU's option spelling and its errors, and
a real libslirp instance (kvmpy.net.slirp.UserNetwork) fed frames through the
socketpair virtio-net would use: ARP, DHCP, host forwarding, the socket bound
against a connection flood, and random malformed frames.

Traffic goes to 127.0.0.1 only (libslirp maps the guest's 10.0.2.2 to it)."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import guest_path, run_kvmpy
from kvmpy.config import config_from_dict, parse_netdev, parse_user_net_options
from kvmpy.errors import ConfigError
from kvmpy.net.options import parse_hostfwd
from support import frames

FUZZ = os.environ.get("KVMPY_FUZZ") == "1"

try:
    from kvmpy.net import slirp as slirp_mod
    SLIRP_SKIP = None
except ImportError as e:       # the native part was not built (no libslirp-dev)
    slirp_mod = None
    SLIRP_SKIP = f"kvmpy.net._slirp_cffi is not built ({e}); apt-get install libslirp-dev and rebuild"


# --- options ---------------------------------------------------------------------------------
def test_defaults_are_qemus():
    net = parse_netdev("user")
    u = net.user
    assert net.type == "user"
    assert (str(u.net), str(u.host), str(u.dhcpstart), str(u.dns)) == \
        ("10.0.2.0/24", "10.0.2.2", "10.0.2.15", "10.0.2.3")
    assert (str(u.ipv6_net), str(u.ipv6_host), str(u.ipv6_dns)) == ("fec0::/64", "fec0::2", "fec0::3")
    assert not u.restrict and u.ipv4 and u.ipv6 and u.hostfwd == ()


def test_command_line_options():
    net = parse_netdev("user,net=192.168.76.0/255.255.255.0,restrict=on,ipv6=off,hostname=vm1,"
                       "hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:6000-10.0.2.15:6001,"
                       "mac=52:54:00:aa:bb:cc")
    u = net.user
    assert str(u.net) == "192.168.76.0/24" and str(u.host) == "192.168.76.2"
    assert str(u.dhcpstart) == "192.168.76.15" and u.restrict and not u.ipv6 and u.hostname == "vm1"
    assert net.mac == "52:54:00:aa:bb:cc"
    tcp, udp = u.hostfwd
    assert (tcp.udp, str(tcp.host_addr), tcp.host_port, tcp.guest_addr, tcp.guest_port) == \
        (False, "0.0.0.0", 2222, None, 22)
    assert (udp.udp, str(udp.host_addr), udp.host_port, str(udp.guest_addr), udp.guest_port) == \
        (True, "127.0.0.1", 6000, "10.0.2.15", 6001)


def test_classful_net_without_mask():
    assert str(parse_netdev("user,net=10.0.0.0").user.net) == "10.0.0.0/8"
    assert str(parse_netdev("user,net=172.16.0.0").user.net) == "172.16.0.0/16"
    assert str(parse_netdev("user,net=192.168.5.0").user.net) == "192.168.5.0/24"


def test_vm_toml_table():
    cfg = config_from_dict({"net": [{"type": "user", "restrict": True, "hostfwd": ["tcp::5555-:22"],
                                     "dns": "10.0.2.4", "guestfwd": "tcp:10.0.2.100:1234-tcp:127.0.0.1:4321"}]},
                           "vm.toml")
    u = cfg.nets[0].user
    assert u.restrict and u.hostfwd[0].host_port == 5555 and str(u.dns) == "10.0.2.4"
    g = u.guestfwd[0]
    assert (str(g.server), g.port, g.host, g.host_port) == ("10.0.2.100", 1234, "127.0.0.1", 4321)


@pytest.mark.parametrize("spec, words", [
    ("user,hostfwd=tcp::99999-:22", "bad host port"),
    ("user,hostfwd=tcp::22", "invalid host forwarding rule"),
    ("user,hostfwd=sctp::22-:22", "invalid host forwarding rule"),
    ("user,hostfwd=tcp:1.2.3:22-:22", "bad address"),
    ("user,hostfwd=tcp::22-:0", "bad guest port"),
    ("user,net=10.0.2.1/24", "host bits"),
    ("user,net=10.0.2.0/31", "prefix"),
    ("user,dhcpstart=10.0.3.15", "dhcpstart=10.0.3.15 is not a host address"),
    ("user,host=10.0.2.255", "host=10.0.2.255"),
    ("user,restrict=maybe", "restrict: expected on or off"),
    ("user,ipv4=off,ipv6=off", "cannot both be off"),
    ("user,tftp=/tmp", "unknown option 'tftp'"),
    ("user,smb=/nonexistent-kvmpy-dir", "smb: /nonexistent-kvmpy-dir is not a directory"),
    ("user,restrict=on,restrict=off", "given twice"),
    ("user,guestfwd=tcp:10.0.2.100:1234-cmd:cat", "'cmd:' is not supported"),
    ("user,guestfwd=tcp:10.9.2.100:1234-tcp:127.0.0.1:1", "not in the guest network"),
    ("user,mac=01:00:00:00:00:01", "multicast"),
    ("user,ipv6-net=fec0::/127", "at most 126"),
    ("slirp", "must be 'tap' or 'user'"),
])
def test_bad_options_are_one_line(spec, words):
    with pytest.raises(ConfigError) as e:
        parse_netdev(spec)
    message = str(e.value)
    assert words in message and "\n" not in message
    assert message.startswith(f"--net {spec}") or message.startswith("--net ")


def test_vm_toml_errors_name_the_table():
    with pytest.raises(ConfigError, match=r"vm.toml: \[\[net\]\] #1: hostfwd"):
        config_from_dict({"net": [{"type": "user", "hostfwd": [22]}]}, "vm.toml")
    with pytest.raises(ConfigError, match=r"vm.toml: \[\[net\]\] #1: unknown option 'bridge'"):
        config_from_dict({"net": [{"type": "user", "bridge": "br0"}]}, "vm.toml")


def test_parse_user_net_options_takes_typed_and_string_values():
    """The entry point kvmpy/qemu_cli.py calls for -netdev user / -nic user."""
    a = parse_user_net_options({"restrict": "on", "hostfwd": ["tcp::1-:2"], "id": "n0"}, "-netdev user")
    b = parse_user_net_options({"restrict": True, "hostfwd": "tcp::1-:2"}, "vm.toml")
    assert a.user == b.user


@settings(max_examples=500 if FUZZ else 60, deadline=None)
@given(st.text(alphabet="tcpud:0123456789.-/x ", max_size=40))
def test_hostfwd_parser_takes_anything(spec):
    """Any string is a rule or one ConfigError line, never another exception."""
    try:
        rule = parse_hostfwd(spec, "hostfwd")
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert 1 <= rule.host_port <= 65535 and 1 <= rule.guest_port <= 65535


@settings(max_examples=500 if FUZZ else 80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.sampled_from(["cidr", "mask", "none"]))
# A user's make test: the top /29's default dhcpstart (+15) was past 255.255.255.255,
# and ipaddress's ValueError came out as a traceback.
@example(address=4_294_967_288, prefix=29, spelling="cidr")
def test_any_net_gets_qemus_defaults_inside_it(address, prefix, spelling):
    """Whatever net= a user gives: a ConfigError line, or host .2, dns .3 and
    dhcpstart .15 that are host addresses of it (a net too small for them is refused)."""
    from ipaddress import IPv4Address, IPv4Network
    net = IPv4Network(f"{IPv4Address(address)}/{prefix}", strict=False)
    text = {"cidr": f"{net.network_address}/{prefix}", "mask": f"{net.network_address}/{net.netmask}",
            "none": str(net.network_address)}[spelling]
    try:
        u = parse_netdev(f"user,net={text}").user
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    for addr in (u.host, u.dns, u.dhcpstart):
        assert addr in u.net and addr not in (u.net.network_address, u.net.broadcast_address)
    assert len({u.host, u.dns}) == 2


@pytest.mark.parametrize("spec, key", [("net=255.255.255.248/29", "dhcpstart"), ("net=255.255.255.252/30", "dns"),
                                       ("net=10.0.2.0/30", "dns"), ("net=10.0.2.0/29", "dhcpstart")])
def test_a_default_address_outside_the_net_is_one_config_error(spec, key):
    with pytest.raises(ConfigError) as e:
        parse_netdev(f"user,{spec}")
    assert f"the default {key} " in str(e.value) and "\n" not in str(e.value)


def test_the_default_smbserver_must_fit_the_net_too(tmp_path):
    with pytest.raises(ConfigError, match="the default smbserver"):
        parse_netdev(f"user,net=255.255.255.252/30,host=255.255.255.253,dns=255.255.255.254,"
                     f"dhcpstart=255.255.255.254,smb={tmp_path}")
    assert str(parse_netdev(f"user,smb={tmp_path}").user.smbserver) == "10.0.2.4"


# --- a real libslirp instance ----------------------------------------------------------------
@pytest.fixture
def loop():
    from kvmpy.events import EventLoop
    ev = EventLoop("test-usernet")
    ev.start()
    yield ev
    ev.close()


def _user_net(loop, spec="user", **kw):
    if SLIRP_SKIP:
        pytest.skip(SLIRP_SKIP)
    return slirp_mod.UserNetwork(parse_netdev(spec).user, loop, **kw)


def _send(net, frame: bytes) -> None:
    os.write(net.port.fd, b"\0" * 12 + frame)


def _receive(net, want, timeout=3.0) -> bytes:
    """The first frame from libslirp for which want(frame) holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([net.port.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        record = os.read(net.port.fd, 65536)
        assert record[:12] == b"\0" * 12       # no offloads: an all-zero vnet header
        if want(record[12:]):
            return record[12:]
    pytest.fail("no such frame from libslirp")


def test_arp_and_dhcp(loop):
    with _user_net(loop) as net:
        _send(net, frames.arp_request("10.0.2.15", "10.0.2.2"))
        reply = _receive(net, lambda f: f[12:14] == b"\x08\x06")
        assert reply[14 + 7] == 2 and socket.inet_ntoa(reply[14 + 14:14 + 18]) == "10.0.2.2"
        _send(net, frames.dhcp_discover())
        offer = _receive(net, lambda f: frames.parse_dhcp_yiaddr(f) is not None)
        assert frames.parse_dhcp_yiaddr(offer) == "10.0.2.15"
        assert net.stats()["from_guest"] == 2


def test_hostfwd_add_remove_and_port_taken(loop):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with _user_net(loop, f"user,hostfwd=tcp:127.0.0.1:{_free_port()}-:22") as net:
        info = net.connection_info()
        assert "HOST_FORWARD" in info and "10.0.2.15" in info
        with pytest.raises(ConfigError, match=rf"could not set up host forwarding rule 'tcp:127.0.0.1:{port}-:22'"):
            net.add_hostfwd(parse_hostfwd(f"tcp:127.0.0.1:{port}-:22", "t"))
        free = _free_port()
        net.add_hostfwd(parse_hostfwd(f"udp:127.0.0.1:{free}-:53", "t"))
        assert "UDP[HOST_FORWARD]" in net.connection_info()
        from ipaddress import IPv4Address
        assert net.remove_hostfwd(True, IPv4Address("127.0.0.1"), free)
        assert not net.remove_hostfwd(True, IPv4Address("127.0.0.1"), free)
        assert "UDP[HOST_FORWARD]" not in net.connection_info()
    taken.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hostfwd_reaches_the_guest_side(loop):
    """A host connection to the forwarded port makes libslirp send the guest a SYN."""
    port = _free_port()
    with _user_net(loop, f"user,hostfwd=tcp:127.0.0.1:{port}-:22") as net:
        _send(net, frames.arp_request("10.0.2.15", "10.0.2.2"))     # libslirp learns our MAC
        _receive(net, lambda f: f[12:14] == b"\x08\x06")
        client = socket.create_connection(("127.0.0.1", port), timeout=3)
        syn = _receive(net, lambda f: f[12:14] == b"\x08\x00" and f[14 + 9] == 6)
        tcp_off = 14 + (syn[14] & 15) * 4
        dport = struct.unpack("!H", syn[tcp_off + 2:tcp_off + 4])[0]
        assert socket.inet_ntoa(syn[14 + 16:14 + 20]) == "10.0.2.15" and dport == 22
        assert syn[tcp_off + 13] & 0x02
        client.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_connection_flood_is_bounded(loop):
    """A guest opening connections without end gets at most max_sockets host sockets;
    the rest of its SYNs are dropped, and the process's descriptors stay bounded."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    with _user_net(loop, max_sockets=32) as net:
        before = _fd_count()
        flood = 2000
        for i in range(flood):
            while True:
                try:
                    _send(net, frames.ip_frame(frames.tcp("10.0.2.15", 20000 + i, "10.0.2.2", port, frames.TCP_SYN)))
                    break
                except BlockingIOError:     # the socketpair is full: wait as a NIC's TX ring would
                    time.sleep(0.01)
        deadline = time.monotonic() + 10
        while net.stats()["from_guest"] + net.stats()["from_guest_dropped"] < flood and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = net.stats()
        assert stats["from_guest"] + stats["from_guest_dropped"] == flood, stats
        assert stats["flows_refused"] >= flood - 40, stats
        assert stats["sockets"] <= 33, stats
        assert _fd_count() - before <= 40
    listener.close()


def test_oversized_and_runt_frames_are_dropped(loop):
    with _user_net(loop) as net:
        os.write(net.port.fd, b"\0" * 12 + b"\x01" * 9000)
        os.write(net.port.fd, b"\0" * 12 + b"\x01" * 5)
        os.write(net.port.fd, b"\0" * 3)
        deadline = time.monotonic() + 3
        while net.stats()["from_guest_dropped"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert net.stats()["from_guest_dropped"] == 3 and net.stats()["from_guest"] == 0


def test_restrict_refuses_outbound(loop):
    """restrict=on: a guest SYN to the host (10.0.2.2 -> 127.0.0.1) opens no host connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(1.0)
    port = listener.getsockname()[1]
    for spec, expect in (("user,restrict=on", False), ("user", True)):
        with _user_net(loop, spec) as net:
            _send(net, frames.ip_frame(frames.tcp("10.0.2.15", 40000, "10.0.2.2", port, frames.TCP_SYN)))
            try:
                conn, _ = listener.accept()
                conn.close()
                accepted = True
            except socket.timeout:
                accepted = False
            assert accepted == expect, spec
    listener.close()


# Malformed frames of the kinds a hostile guest sends: ARP with any fields, IPv4 with any
# header bytes and protocol, DHCP-shaped UDP with random options, TCP with random flags to
# the host, and plain garbage. Destinations stay inside 10.0.2.0/24 (10.0.2.2 is loopback).
_ip_in_net = st.integers(0, 255).map(lambda n: f"10.0.2.{n}")
_frame = st.one_of(
    st.builds(lambda hdr, tail: frames.ether(frames.BROADCAST, 0x0806, hdr + tail),
              st.binary(min_size=8, max_size=8), st.binary(max_size=40)),
    st.builds(lambda ver_ihl, rest, proto, payload: frames.ether(b"\x52\x55\x0a\x00\x02\x02", 0x0800,
              bytes([ver_ihl]) + rest[:8] + bytes([proto]) + rest[8:] + payload),
              st.integers(0, 255), st.binary(min_size=18, max_size=18), st.integers(0, 255), st.binary(max_size=200)),
    st.builds(lambda opts, xid: frames.dhcp_discover(xid)[:-4] + opts,
              st.binary(max_size=80), st.integers(0, 2**32 - 1)),
    st.builds(lambda sport, flags, seq, data: frames.ip_frame(frames.tcp("10.0.2.15", sport, "10.0.2.2", 9, flags,
                                                                         seq=seq, data=data)),
              st.integers(1, 65535), st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.builds(lambda dst, dport, data: frames.ip_frame(frames.udp("10.0.2.15", 5000, dst, dport, data)),
              _ip_in_net.filter(lambda a: a != "10.0.2.3"), st.integers(1, 65535), st.binary(max_size=64)),
    st.binary(max_size=1600),
)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def test_random_frames_do_not_crash_or_grow(loop):
    """Random malformed frames through the real socketpair path into one libslirp
    instance: the VMM goes on answering ARP, host sockets and memory stay bounded."""
    net = _user_net(loop, max_sockets=64)
    rss_before = _rss_kib()
    fds_before = _fd_count()
    sent = {"n": 0}

    @settings(max_examples=3000 if FUZZ else 300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_frame)
    def feed(frame):
        try:
            _send(net, frame)
        except BlockingIOError:       # the buffer is full: the guest's TX drops, as a NIC's would
            time.sleep(0.01)
        sent["n"] += 1
        while True:                   # drain replies so libslirp's sends are not all dropped
            r, _, _ = select.select([net.port.fd], [], [], 0)
            if not r:
                break
            os.read(net.port.fd, 65536)
    try:
        feed()
        _send(net, frames.arp_request("10.0.2.15", "10.0.2.2"))
        _receive(net, lambda f: f[12:14] == b"\x08\x06" and f[14 + 7] == 2)
        stats = net.stats()
        assert stats["sockets"] <= 65, stats
        assert _fd_count() - fds_before <= 70
        assert _rss_kib() - rss_before < 64 << 10, "more than 64 MiB grown"
    finally:
        net.close()


def test_libslirp_timers_ride_on_the_event_loop(loop):
    """With IPv6 on, libslirp arms its router-advertisement timer (SLIRP_TIMER_RA) at
    start, 200-600 s ahead: the deadline libslirp gives in its clock's milliseconds
    becomes an event-loop timer that far ahead. Without IPv6 there is none."""
    with _user_net(loop) as net:
        timers = list(net._slirp_timers.values())
        assert len(timers) == 1 and timers[0].pending is not None
        assert 150 <= timers[0].pending.when - time.monotonic() <= 650
    with _user_net(loop, "user,ipv6=off") as net:
        assert not any(t.pending for t in net._slirp_timers.values())


def test_guest_errors_are_logged_rate_limited(loop, caplog):
    with _user_net(loop) as net:
        with caplog.at_level("WARNING", logger="kvmpy.net.slirp"):
            for i in range(100):
                slirp_mod.kvmpy_slirp_guest_error(slirp_mod.ffi.new("char[]", f"bad {i}".encode()), net._handle)
        logged = [r for r in caplog.records if "guest error" in r.getMessage()]
        assert len(logged) == slirp_mod.GUEST_ERROR_BURST
        assert net.stats()["guest_errors_dropped"] == 100 - slirp_mod.GUEST_ERROR_BURST


def test_close_releases_descriptors(loop):
    before = _fd_count()
    for _ in range(20):
        _user_net(loop, f"user,hostfwd=tcp:127.0.0.1:{_free_port()}-:22").close()
    assert _fd_count() == before


@pytest.fixture
def loopback_dns(tmp_path, monkeypatch):
    """A DNS responder on 127.0.0.1:53 and a resolv.conf naming it (KVMPY_RESOLV_CONF)."""
    from support.dns import LoopbackDns, port_53_busy
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 53))
    except OSError as e:
        sock.close()
        pytest.skip(port_53_busy(e))
    dns = LoopbackDns(sock)
    dns.start()
    conf = tmp_path / "resolv.conf"
    conf.write_text("# test\nnameserver 127.0.0.1\n")
    monkeypatch.setenv("KVMPY_RESOLV_CONF", str(conf))
    yield dns
    dns.stop()


def _dns_query(name: str, ident: int) -> bytes:
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question


# 127.0.0.1:53 is one port: test_usernet.py holds it for its whole module
@pytest.mark.xdist_group("usernet-guest")
def test_dns_is_forwarded_to_the_resolv_conf_server(loop, loopback_dns):
    with _user_net(loop) as net:
        _send(net, frames.ip_frame(frames.udp("10.0.2.15", 33333, "10.0.2.3", 53, _dns_query("a.example", 77))))
        reply = _receive(net, lambda f: f[12:14] == b"\x08\x00" and f[14 + 9] == 17)
        ip, udp = reply[14:34], reply[34:]
        assert frames.checksum(ip) == 0
        assert socket.inet_ntoa(ip[12:16]) == "10.0.2.3" and socket.inet_ntoa(ip[16:20]) == "10.0.2.15"
        assert struct.unpack("!HH", udp[:4]) == (53, 33333)
        assert udp[8:10] == struct.pack("!H", 77) and socket.inet_aton("192.0.2.53") in udp
        assert loopback_dns.queries == 1


# 127.0.0.1:53 is one port: test_usernet.py holds it for its whole module
@pytest.mark.xdist_group("usernet-guest")
def test_restricted_network_has_no_dns_forwarder(loop, loopback_dns):
    with _user_net(loop, "user,restrict=on") as net:
        _send(net, frames.ip_frame(frames.udp("10.0.2.15", 33333, "10.0.2.3", 53, _dns_query("a.example", 78))))
        time.sleep(0.5)
        assert loopback_dns.queries == 0


def test_sandbox_allows_sockets_only_with_a_user_nic():
    from kvmpy import sandbox
    plain, user = sandbox.policy(1), sandbox.policy(1, user_network=True)
    for name in sandbox.USER_NETWORK_CALLS:
        assert name in sandbox.SYSCALLS
        assert user[name].allow
        assert name not in plain or not plain[name].allow, name


# --- the human monitor, on a state-only VM with real user networks -------------------------------
@pytest.fixture
def hmp_with_usernets(loop):
    from kvmpy.monitor.hmp import Hmp
    from test_qmp_statevm import StateVm
    nets = [_user_net(loop), _user_net(loop, "user,net=10.0.3.0/24")]

    class VmWithUserNets(StateVm):
        def network_devices(self):
            return [{"name": f"net{i}", "type": "user", "net": str(n.options.net), "mac": "52:54:00:12:34:56",
                     "usernet": n} for i, n in enumerate(nets)]
    vm = VmWithUserNets(name="usernet")
    yield Hmp(vm), nets
    vm.close()
    for n in nets:
        n.close()


def test_hmp_hostfwd_commands(hmp_with_usernets):
    hmp, nets = hmp_with_usernets
    port = _free_port()
    assert hmp.execute(f"hostfwd_add tcp:127.0.0.1:{port}-:22").startswith("hostfwd_add: several user networks")
    assert hmp.execute(f"hostfwd_add net1 tcp:127.0.0.1:{port}-:22") == ""
    assert f"127.0.0.1 {port}" in " ".join(nets[1].connection_info().split())
    assert f"127.0.0.1 {port}" not in " ".join(nets[0].connection_info().split())
    assert hmp.execute(f"hostfwd_add net0 tcp:127.0.0.1:{port}-:22") == \
        f"could not set up host forwarding rule 'tcp:127.0.0.1:{port}-:22'\n"
    assert "invalid host forwarding rule" in hmp.execute("hostfwd_add net0 tcp:127.0.0.1:x-:22")
    assert "unknown netdev 'net9'" in hmp.execute("hostfwd_add net9 tcp::1-:2")
    assert hmp.execute("hostfwd_remove net1 tcp:127.0.0.1:bad") == "invalid format\n"
    assert hmp.execute(f"hostfwd_remove net1 tcp:127.0.0.1:{port}") == \
        f"host forwarding rule for tcp:127.0.0.1:{port} removed\n"
    assert hmp.execute(f"hostfwd_remove net1 tcp:127.0.0.1:{port}") == \
        f"host forwarding rule for tcp:127.0.0.1:{port} not found\n"
    info = hmp.execute("info usernet")
    assert info.index("Hub -1 (net0):") < info.index("Hub -1 (net1):")
    assert "index=1,type=user,net=10.0.3.0/24" in hmp.execute("info network")
    assert "hostfwd_add" in hmp.execute("help")


def test_hmp_hostfwd_without_a_user_network():
    from kvmpy.monitor.hmp import Hmp
    from test_qmp_statevm import StateVm
    vm = StateVm(name="tap-only")
    try:
        assert "no user-mode network" in Hmp(vm).execute("hostfwd_add tcp::1-:2")
        assert Hmp(vm).execute("info usernet") == ""
    finally:
        vm.close()


# --- the command line ------------------------------------------------------------------------
def test_port_taken_is_one_line_and_status_2():
    if SLIRP_SKIP:
        pytest.skip(SLIRP_SKIP)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("hello"),
                       "--net", f"user,hostfwd=tcp:127.0.0.1:{port}-:22"], timeout=60)
    finally:
        taken.close()
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert err.strip().splitlines() == [f"kvmpy: net0: could not set up host forwarding rule "
                                         f"'tcp:127.0.0.1:{port}-:22'"], err


def test_bad_net_option_is_one_line_and_status_2():
    p = run_kvmpy(["run", "--accel", "tcg", "--kernel", guest_path("hello"), "--net", "user,restrict=maybe"])
    assert p.returncode == 2
    assert p.stderr.decode().strip().splitlines() == ["kvmpy: --net user,restrict=maybe: restrict: expected on "
                                                      "or off, got 'maybe'"]



# --- offloads: what the guest leaves to the device (VIRTIO_NET_F_CSUM, HOST_TSO4) ------------
VNET_F_NEEDS_CSUM = 1
VNET_GSO_TCPV4 = 1
VNET_GSO_UDP = 3
ETH_IP = 14 + 20            # where an option-less IPv4 packet's payload starts in the frame


def _vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


def _partial(frame: bytes, proto: int, field: int) -> bytes:
    """The frame as Linux hands it over with NEEDS_CSUM: the transport checksum field
    holds the pseudo-header's sum (not complemented), the rest is the device's job."""
    ip = frame[14:ETH_IP]
    length = len(frame) - ETH_IP
    pseudo = ~frames.checksum(ip[12:20] + struct.pack("!BBH", 0, proto, length)) & 0xFFFF
    at = ETH_IP + field
    return frame[:at] + struct.pack("!H", pseudo) + frame[at + 2:]


def _tcp_fields(frame: bytes) -> tuple[int, int, int]:
    off = 14 + (frame[14] & 15) * 4
    seq, ack = struct.unpack("!II", frame[off + 4:off + 12])
    return seq, ack, frame[off + 13]


def _connect_to_host(net, port: int, guest_port: int):
    """The guest side of a TCP handshake with 127.0.0.1:port through libslirp: the
    next sequence numbers (guest's, libslirp's)."""
    _send(net, frames.arp_request("10.0.2.15", "10.0.2.2"))
    _receive(net, lambda f: f[12:14] == b"\x08\x06")
    _send(net, frames.ip_frame(frames.tcp("10.0.2.15", guest_port, "10.0.2.2", port, frames.TCP_SYN, seq=1000)))
    synack = _receive(net, lambda f: f[12:14] == b"\x08\x00" and f[14 + 9] == 6 and _tcp_fields(f)[2] & 0x12 == 0x12)
    server_seq = _tcp_fields(synack)[0]
    _send(net, frames.ip_frame(frames.tcp("10.0.2.15", guest_port, "10.0.2.2", port, 0x10, seq=1001,
                                          ack=server_seq + 1)))
    return 1001, server_seq + 1


def test_tso_frames_reach_the_host_as_one_byte_stream(loop):
    """A 64 KiB-style TSO frame (here 20 segments' worth, the last one short) is cut
    into MSS-sized segments libslirp accepts: its IP and TCP checksums are checked,
    so every segment must be right for the host to read the bytes in order."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(5)
    port = listener.getsockname()[1]
    with _user_net(loop) as net:
        seq, ack = _connect_to_host(net, port, 40001)
        conn, _ = listener.accept()
        conn.settimeout(5)
        payload = os.urandom(1400 * 19 + 321)
        frame = frames.ip_frame(frames.tcp("10.0.2.15", 40001, "10.0.2.2", port, 0x18, seq=seq, ack=ack,
                                           data=payload))
        os.write(net.port.fd, _vnet(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, ETH_IP + 20, 1400, ETH_IP, 16) +
                 _partial(frame, 6, 16))
        got = b""
        while len(got) < len(payload):
            chunk = conn.recv(65536)
            assert chunk, "the host connection closed early"
            got += chunk
        assert got == payload
        stats = net.stats()
        assert stats["from_guest_gso"] == 1 and stats["from_guest_dropped"] == 0, stats
        # libslirp acknowledges the whole stream: no segment was lost or refused.
        _receive(net, lambda f: f[12:14] == b"\x08\x00" and f[14 + 9] == 6 and
                 _tcp_fields(f)[1] == seq + len(payload), timeout=5)
        conn.close()
    listener.close()


def test_a_checksum_left_to_the_device_is_completed(loop):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    with _user_net(loop) as net:
        frame = frames.ip_frame(frames.udp("10.0.2.15", 5555, "10.0.2.2", port, b"left to the device"))
        os.write(net.port.fd, _vnet(VNET_F_NEEDS_CSUM, csum_start=ETH_IP, csum_offset=6) + _partial(frame, 17, 6))
        data, _ = receiver.recvfrom(100)
        assert data == b"left to the device"
        assert net.stats()["csum_completed"] == 1
        # The same partial sum without NEEDS_CSUM is a bad checksum: libslirp drops it.
        os.write(net.port.fd, _vnet() + _partial(frame, 17, 6))
        with pytest.raises(socket.timeout):
            receiver.settimeout(1)
            receiver.recvfrom(100)
    receiver.close()


def test_offload_headers_that_do_not_fit_are_dropped(loop):
    """A hostile guest's vnet header: a segment size that would make thousands of
    segments, GSO types not offered, checksum offsets past the frame, TSO on what is
    no TCP/IPv4 frame. Each is one dropped frame; the network goes on answering."""
    tcp_frame = frames.ip_frame(frames.tcp("10.0.2.15", 40002, "10.0.2.2", 9, 0x18, data=b"x" * 3000))
    udp_frame = frames.ip_frame(frames.udp("10.0.2.15", 5555, "10.0.2.2", 9, b"y" * 100))
    bad = [
        _vnet(0, VNET_GSO_TCPV4, 54, 1, ETH_IP, 16) + tcp_frame,              # gso_size 1
        _vnet(0, VNET_GSO_TCPV4, 54, 0, ETH_IP, 16) + tcp_frame,              # gso_size 0
        _vnet(0, VNET_GSO_TCPV4, 54, 1500, ETH_IP, 16) + tcp_frame,           # segments above the MTU
        _vnet(0, VNET_GSO_UDP, 42, 1000, ETH_IP, 6) + udp_frame,              # UFO: not offered
        _vnet(0, 4, 74, 1000) + tcp_frame,                                    # TCPv6 on an IPv4 frame
        _vnet(0, VNET_GSO_TCPV4, 42, 1000) + udp_frame,                       # TSO on UDP
        _vnet(0, VNET_GSO_TCPV4, 54, 1000) + tcp_frame[:40],                  # headers cut short
        _vnet(VNET_F_NEEDS_CSUM, 0, 0, 0, len(udp_frame), 0) + udp_frame,     # csum_start past the end
        _vnet(VNET_F_NEEDS_CSUM, 0, 0, 0, ETH_IP, len(udp_frame)) + udp_frame,  # csum_offset past the end
        _vnet(VNET_F_NEEDS_CSUM, 0, 0, 0, ETH_IP, 6) + b"\x01" * 1600,        # above the MTU, no TSO
    ]
    with _user_net(loop) as net:
        for record in bad:
            os.write(net.port.fd, record)
        deadline = time.monotonic() + 3
        while net.stats()["from_guest_dropped"] < len(bad) and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = net.stats()
        assert stats["from_guest_dropped"] == len(bad) and stats["from_guest"] == 0, stats
        _send(net, frames.arp_request("10.0.2.15", "10.0.2.2"))
        _receive(net, lambda f: f[12:14] == b"\x08\x06" and f[14 + 7] == 2)


@settings(max_examples=1500 if FUZZ else 150, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=st.binary(min_size=12, max_size=12), frame=st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda data, flags: frames.ip_frame(frames.tcp("10.0.2.15", 40003, "10.0.2.2", 9, flags,
                                                             data=data)),
              st.binary(max_size=6000), st.integers(0, 255))))
def test_random_offload_headers_never_crash_or_grow(header, frame):
    """Any 12 header bytes before any frame: dropped or handed on, never a crash, and
    the C side's buffers stay its two fixed ones."""
    from kvmpy.events import EventLoop
    if SLIRP_SKIP:
        pytest.skip(SLIRP_SKIP)
    global _OFFLOAD_NET
    if _OFFLOAD_NET is None:
        ev = EventLoop("test-usernet-offload")
        ev.start()
        _OFFLOAD_NET = (ev, slirp_mod.UserNetwork(parse_netdev("user").user, ev, max_sockets=32))
    net = _OFFLOAD_NET[1]
    try:
        os.write(net.port.fd, header + frame)
    except BlockingIOError:
        time.sleep(0.01)
    while select.select([net.port.fd], [], [], 0)[0]:
        os.read(net.port.fd, 65536)
    assert net.stats()["sockets"] <= 33


_OFFLOAD_NET = None


@pytest.fixture(scope="module", autouse=True)
def _close_offload_net():
    yield
    if _OFFLOAD_NET is not None:
        ev, net = _OFFLOAD_NET
        net.close()
        ev.close()


# --- the NIC's backend: what it declares is what the driver is offered ----------------------

def test_the_nic_offers_the_offloads_its_backend_declares_and_nothing_else():
    from kvmpy.devices.virtio.net import VIRTIO_NET_F_MQ, VirtioNet
    from kvmpy.net.backend import OFFLOAD_FEATURES
    from support.net_ports import SocketPort

    class NoOffloads(SocketPort):
        offloads = 0

    class Greedy(SocketPort):
        # MQ is the device's to offer (one pair here: not offered); bit 63 no one's
        offloads = SocketPort.offloads | 1 << VIRTIO_NET_F_MQ | 1 << 63

    bare = VirtioNet(NoOffloads()).device_features()
    assert bare & OFFLOAD_FEATURES == 0
    assert VirtioNet(SocketPort()).device_features() == bare | SocketPort.offloads
    assert VirtioNet(Greedy()).device_features() == bare | SocketPort.offloads


def test_the_user_nic_offers_what_its_port_finishes_and_keeps_every_frame_in_python():
    if SLIRP_SKIP:
        pytest.skip(SLIRP_SKIP)
    from kvmpy.devices.virtio import netplane
    from kvmpy.devices.virtio.net import VirtioNet
    from kvmpy.net.backend import (OFFLOAD_FEATURES, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
                                   VIRTIO_NET_F_HOST_TSO4)
    from support.net_ports import SocketPort
    if not netplane.available():
        pytest.skip(f"net data plane not built: {netplane.unavailable_reason()}")
    user = VirtioNet(slirp_mod.FramePort(-1, "user0"))
    assert user.device_features() & OFFLOAD_FEATURES == (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM
                                                         | 1 << VIRTIO_NET_F_HOST_TSO4)
    tap_like = VirtioNet(SocketPort())
    for dev in (user, tap_like):
        dev.ack_features(dev.device_features())
    assert user.native_backend() is None
    assert tap_like.native_backend() is not None       # the same NIC on a tap's contract gets its threads
