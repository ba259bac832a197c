"""User-mode networking's options, spelt as QEMU's ``-netdev user,...`` spells them.

The same parser serves a vm.toml ``[[net]] type = "user"`` table (typed values:
``restrict = true``, ``hostfwd = ["tcp::2222-:22"]``) and ``--net user,key=value,...``
(strings, ``hostfwd=`` repeated). Every error names where the option came from
and is a ConfigError (one line, exit status 2). Nothing here needs libslirp.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ..errors import ConfigError


@dataclass(frozen=True)
class HostForward:
    """``hostfwd=[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport``: connections to
    the host's hostaddr:hostport go to the guest. An empty guest address is the
    first DHCP address (libslirp's rule, as QEMU's)."""
    udp: bool
    host_addr: IPv4Address
    host_port: int
    guest_addr: IPv4Address | None
    guest_port: int
    spec: str


@dataclass(frozen=True)
class GuestForward:
    """``guestfwd=tcp:server:port-tcp:hostaddr:hostport``: a guest connection to
    server:port (a virtual address in the guest's net) is joined to a host TCP
    connection, made to hostaddr:hostport when the VM starts (QEMU's chardev form)."""
    server: IPv4Address
    port: int
    host: str
    host_port: int
    spec: str


@dataclass(frozen=True)
class UserNetOptions:
    """QEMU's -netdev user options: the guest's subnet, its addresses, forwards and services."""

    net: IPv4Network = IPv4Network("10.0.2.0/24")
    host: IPv4Address = IPv4Address("10.0.2.2")
    dhcpstart: IPv4Address = IPv4Address("10.0.2.15")
    dns: IPv4Address = IPv4Address("10.0.2.3")
    ipv4: bool = True
    ipv6: bool = True
    ipv6_net: IPv6Network = IPv6Network("fec0::/64")
    ipv6_host: IPv6Address = IPv6Address("fec0::2")
    ipv6_dns: IPv6Address = IPv6Address("fec0::3")
    hostname: str = ""
    domainname: str = ""
    restrict: bool = False
    hostfwd: tuple[HostForward, ...] = ()
    guestfwd: tuple[GuestForward, ...] = ()
    # QEMU's smb=DIR: a Samba server for the guest at smbserver (default x.x.x.4), port 445
    smb: str = ""
    smbserver: IPv4Address | None = None


USER_NET_KEYS = frozenset({"type", "mac", "net", "host", "dhcpstart", "dns", "hostname", "domainname",
                           "restrict", "hostfwd", "guestfwd", "ipv4", "ipv6", "ipv6-net", "ipv6-prefix",
                           "ipv6-prefixlen", "ipv6-host", "ipv6-dns", "id", "smb", "smbserver"})
_BOOL_WORDS = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False,
               "y": True, "n": False}


def parse_bool(value, where: str) -> bool:
    """QEMU's on/off (and yes/no); a vm.toml's true/false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    raise ConfigError(f"{where}: expected on or off, got {value!r}")


def _str(value, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _v4(value, where: str) -> IPv4Address:
    try:
        return IPv4Address(_str(value, where))
    except ValueError:
        raise ConfigError(f"{where}: not an IPv4 address: {value!r}") from None


def _classful_prefix(addr: IPv4Address) -> int:
    """QEMU's mask for ``net=ADDR`` given without one: the address class's."""
    first = int(addr) >> 24
    if first < 128:
        return 8
    if first < 192:
        return 16
    return 24


def parse_v4_net(value, where: str) -> IPv4Network:
    """``10.0.2.0/24``, ``10.0.2.0/255.255.255.0`` or ``10.0.0.0`` (classful mask)."""
    text = _str(value, where)
    addr, slash, mask = text.partition("/")
    base = _v4(addr, where)
    if not slash:
        prefix = _classful_prefix(base)
    elif mask.isascii() and mask.isdigit() and len(mask) <= 2:
        prefix = int(mask)
    else:
        try:
            prefix = IPv4Network(f"0.0.0.0/{mask}").prefixlen
        except ValueError:
            raise ConfigError(f"{where}: bad netmask in {text!r}") from None
    if not 0 < prefix <= 30:
        raise ConfigError(f"{where}: the prefix must be 1..30 (room for host, DNS and DHCP), got {text!r}")
    net = IPv4Network(f"{base}/{prefix}", strict=False)
    if net.network_address != base:
        raise ConfigError(f"{where}: {base} has host bits set for /{prefix}")
    return net


def _port(text: str, where: str, spec: str, what: str, rule: str = "host forwarding") -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{where}: invalid {rule} rule {spec!r} (bad {what} port {text!r})")
    return int(text)


def parse_hostfwd(spec, where: str) -> HostForward:
    """``[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport``."""
    spec = _str(spec, where)
    host, dash, guest = spec.partition("-")
    proto, _, rest = host.partition(":")
    if not dash or not _ or proto not in ("", "tcp", "udp"):
        raise ConfigError(f"{where}: invalid host forwarding rule {spec!r} "
                          "(expected [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport)")
    haddr, colon, hport = rest.rpartition(":")
    gaddr, gcolon, gport = guest.rpartition(":")
    if not colon or not gcolon:
        raise ConfigError(f"{where}: invalid host forwarding rule {spec!r} "
                          "(expected [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport)")
    try:
        host_addr = IPv4Address(haddr) if haddr else IPv4Address("0.0.0.0")
        guest_addr = IPv4Address(gaddr) if gaddr else None
    except ValueError:
        raise ConfigError(f"{where}: invalid host forwarding rule {spec!r} (bad address)") from None
    return HostForward(udp=proto == "udp", host_addr=host_addr, host_port=_port(hport, where, spec, "host"),
                       guest_addr=guest_addr, guest_port=_port(gport, where, spec, "guest"), spec=spec)


def parse_guestfwd(spec, where: str) -> GuestForward:
    """``[tcp]:server:port-[tcp:]hostaddr:hostport``."""
    spec = _str(spec, where)
    rule, dash, dev = spec.partition("-")
    parts = rule.split(":")
    if parts and parts[0] in ("tcp", ""):
        parts = parts[1:]
    if not dash or len(parts) != 2 or parts[0] == "":
        raise ConfigError(f"{where}: invalid guest forwarding rule {spec!r} "
                          "(expected tcp:server:port-tcp:hostaddr:hostport)")
    try:
        server = IPv4Address(parts[0])
    except ValueError:
        raise ConfigError(f"{where}: invalid guest forwarding rule {spec!r} (bad server address)") from None
    port = _port(parts[1], where, spec, "server", "guest forwarding")
    if dev.startswith("cmd:"):
        raise ConfigError(f"{where}: guest forwarding rule {spec!r}: 'cmd:' is not supported "
                          "(forward to a host address: tcp:HOST:PORT)")
    dev = dev.removeprefix("tcp:")
    host, colon, hport = dev.rpartition(":")
    if not colon or not host:
        raise ConfigError(f"{where}: invalid guest forwarding rule {spec!r} "
                          "(expected tcp:server:port-tcp:hostaddr:hostport)")
    return GuestForward(server=server, port=port, host=host,
                        host_port=_port(hport, where, spec, "host", "guest forwarding"),
                        spec=spec)


def _list(value, where: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"{where}: expected a string or a list of strings, got {value!r}")


def _inside(addr: IPv4Address, net: IPv4Network, key: str, where: str) -> IPv4Address:
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise ConfigError(f"{where}: {key}={addr} is not a host address of the guest network {net}")
    return addr


def _default_inside(net: IPv4Network, offset: int, key: str, where: str) -> IPv4Address:
    """QEMU's default for ``key``: the guest network's address plus ``offset``, which
    must be a host address of it (a net too small, or at the top of the address space,
    has none there)."""
    addr = int(net.network_address) + offset
    if addr >= int(net.broadcast_address):
        raise ConfigError(f"{where}: the default {key} (the network's address + {offset}) is not a host "
                          f"address of the guest network {net}: give {key}= or a larger net=")
    return IPv4Address(addr)


def parse_user_options(opts: dict, where: str) -> UserNetOptions:
    """A user NIC's options (without ``type`` and ``mac``) -> UserNetOptions.
    ``where`` prefixes errors: ``"vm.toml: [[net]] #1"`` or ``"--net user,..."``."""
    for key in opts:
        if key not in USER_NET_KEYS:
            raise ConfigError(f"{where}: unknown option {key!r} for a user network "
                              f"(known: {', '.join(sorted(USER_NET_KEYS - {'type', 'id'}))})")
    w = lambda key: f"{where}: {key}"  # noqa: E731
    net = parse_v4_net(opts["net"], w("net")) if "net" in opts else UserNetOptions.net
    host = (_inside(_v4(opts["host"], w("host")), net, "host", where) if "host" in opts
            else _default_inside(net, 2, "host", where))
    dns = (_inside(_v4(opts["dns"], w("dns")), net, "dns", where) if "dns" in opts
           else _default_inside(net, 3, "dns", where))
    dhcp = (_inside(_v4(opts["dhcpstart"], w("dhcpstart")), net, "dhcpstart", where) if "dhcpstart" in opts
            else _default_inside(net, 15, "dhcpstart", where))
    if len({host, dns}) != 2:
        raise ConfigError(f"{where}: host and dns must differ ({host})")
    ipv4 = parse_bool(opts.get("ipv4", True), w("ipv4"))
    ipv6 = parse_bool(opts.get("ipv6", True), w("ipv6"))
    if not ipv4 and not ipv6:
        raise ConfigError(f"{where}: IPv4 and IPv6 cannot both be off")
    v6 = UserNetOptions.ipv6_net
    key6 = "ipv6-net" if "ipv6-net" in opts else "ipv6-prefix" if "ipv6-prefix" in opts else None
    if key6:
        text = _str(opts[key6], w(key6))
        if "/" not in text:
            text += "/" + str(opts.get("ipv6-prefixlen", 64))
        try:
            v6 = IPv6Network(text)
        except ValueError:
            raise ConfigError(f"{where}: {key6}: not an IPv6 network: {text!r}") from None
        if v6.prefixlen > 126:
            raise ConfigError(f"{where}: {key6}: the prefix must be at most 126, got {text!r}")
    v6base = int(v6.network_address)
    v6addr = {}
    for key, offset in (("ipv6-host", 2), ("ipv6-dns", 3)):
        try:
            v6addr[key] = (IPv6Address(_str(opts[key], w(key))) if key in opts
                           else IPv6Address(v6base + offset))
        except ValueError:
            raise ConfigError(f"{where}: {key}: not an IPv6 address: {opts[key]!r}") from None
        if v6addr[key] not in v6:
            raise ConfigError(f"{where}: {key}={v6addr[key]} is not in {v6}")
    hostname = _str(opts.get("hostname", ""), w("hostname"))
    domainname = _str(opts.get("domainname", ""), w("domainname"))
    for key, value in (("hostname", hostname), ("domainname", domainname)):
        # They travel in DHCP options of at most 255 bytes, and to C as strings.
        if len(value.encode()) > 255 or "\0" in value:
            raise ConfigError(f"{where}: {key} must be at most 255 bytes without NUL, got {value!r}")
    hostfwd = tuple(parse_hostfwd(s, w("hostfwd")) for s in _list(opts.get("hostfwd", []), w("hostfwd")))
    guestfwd = tuple(parse_guestfwd(s, w("guestfwd")) for s in _list(opts.get("guestfwd", []), w("guestfwd")))
    for fwd in guestfwd:
        if fwd.server not in net:
            raise ConfigError(f"{where}: guestfwd {fwd.spec!r}: {fwd.server} is not in the guest network {net}")
    smb, smbserver = "", None
    if "smb" in opts:
        smb = os.path.abspath(_str(opts["smb"], w("smb")))
        if not os.path.isdir(smb):
            raise ConfigError(f"{where}: smb: {smb} is not a directory")
        smbserver = (_inside(_v4(opts["smbserver"], w("smbserver")), net, "smbserver", where)
                     if "smbserver" in opts else _default_inside(net, 4, "smbserver", where))
    elif "smbserver" in opts:
        raise ConfigError(f"{where}: smbserver without smb=DIR")
    return UserNetOptions(smb=smb, smbserver=smbserver,
                          net=net, host=host, dhcpstart=dhcp, dns=dns, ipv4=ipv4, ipv6=ipv6, ipv6_net=v6,
                          ipv6_host=v6addr["ipv6-host"], ipv6_dns=v6addr["ipv6-dns"], hostname=hostname,
                          domainname=domainname, restrict=parse_bool(opts.get("restrict", False), w("restrict")),
                          hostfwd=hostfwd, guestfwd=guestfwd)


def split_netdev_options(spec: str, where: str) -> dict:
    """``key=value,key=value`` (after the type) -> a dict; hostfwd and guestfwd may repeat."""
    opts: dict = {}
    for part in spec.split(",") if spec else []:
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"{where}: expected key=value, got {part!r}")
        if key in ("hostfwd", "guestfwd"):
            opts.setdefault(key, []).append(value)
        elif key in opts:
            raise ConfigError(f"{where}: option {key!r} given twice")
        else:
            opts[key] = value
    return opts


__all__ = ["HostForward", "GuestForward", "UserNetOptions", "USER_NET_KEYS", "parse_user_options",
           "parse_hostfwd", "parse_guestfwd", "parse_v4_net", "split_netdev_options"]
