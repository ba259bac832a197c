"""Ethernet frames a guest would send, built by hand for the user-network tests:
ARP, IPv4 with UDP/TCP (``ip_frame`` puts a packet in a frame), DHCP. Checksums are right."""

from __future__ import annotations

import socket
import struct

GUEST_MAC = bytes.fromhex("525400123456")
BROADCAST = b"\xff" * 6
SLIRP_MAC = bytes.fromhex("52550a000202")     # libslirp's own (52:55 then the host address)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst: bytes, ethertype: int, payload: bytes, src: bytes = GUEST_MAC) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(sender_ip: str, target_ip: str, mac: bytes = GUEST_MAC) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(sender_ip) + b"\0" * 6 + \
        socket.inet_aton(target_ip)
    return ether(BROADCAST, 0x0806, body, mac)


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)


def ip_frame(packet: bytes, dst: bytes = SLIRP_MAC) -> bytes:
    """An IPv4 packet in an Ethernet frame to libslirp."""
    return ether(dst, 0x0800, packet)


def udp(src: str, sport: int, dst: str, dport: int, data: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    csum = checksum(_pseudo(src, dst, 17, len(seg)) + seg) or 0xFFFF
    return ipv4(src, dst, 17, seg[:6] + struct.pack("!H", csum) + seg[8:])


def tcp(src: str, sport: int, dst: str, dport: int, flags: int, seq: int = 1000, ack: int = 0,
        data: bytes = b"", window: int = 65535) -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0) + data
    csum = checksum(_pseudo(src, dst, 6, len(seg)) + seg)
    return ipv4(src, dst, 6, seg[:16] + struct.pack("!H", csum) + seg[18:])


TCP_SYN = 0x02


def dhcp_discover(xid: int = 0x1234, mac: bytes = GUEST_MAC) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4, b"\0" * 4,
                        b"\0" * 4, b"\0" * 4, mac + b"\0" * 10, b"", b"")
    options = b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\xff"
    return ip_frame(udp("0.0.0.0", 68, "255.255.255.255", 67, bootp + options), BROADCAST)


def parse_dhcp_yiaddr(frame: bytes) -> str | None:
    """The offered address of a DHCP reply frame, else None."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00" or frame[14 + 9] != 17:
        return None
    ihl = (frame[14] & 15) * 4
    udp_off = 14 + ihl
    if struct.unpack("!H", frame[udp_off:udp_off + 2])[0] != 67:
        return None
    bootp = frame[udp_off + 8:]
    return socket.inet_ntoa(bootp[16:20])
