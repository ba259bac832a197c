"""``kvmpy nbd``: serve a disk image over the Network Block Device protocol.

protocol.py holds the wire format (constants, packing and parsing), server.py
the handshake and transmission phases for each client, kernel.py the kernel's
nbd client (``-c /dev/nbdX``), command.py the command line.
"""
