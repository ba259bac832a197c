"""The ATAPI CD-ROM's command set: the MMC/SPC commands inside an ATA PACKET command.

``AtapiCdrom.execute(cdb)`` runs one 12-byte command descriptor block against the
medium (a kvmpy.block driver of 2048-byte sectors; an ISO is a read-only raw or
qcow2 image) and answers with what the IDE layer must transfer: a reply made
here (INQUIRY, READ TOC, ...) or a byte range of the medium (READ(10)/READ(12)),
which the IDE layer streams by PIO or moves by bus-master DMA. A command that
fails answers CHECK CONDITION: the sense key and additional sense code are kept
for REQUEST SENSE and shown in the ATA error register. The commands are the ones
SeaBIOS (cdrom.c, atapi_is_ready), GRUB, isolinux and Linux's sr driver send,
after SPC-3 and MMC-5; QEMU's hw/ide/atapi.c answers the same set.

Pure state machine: no I/O of its own beyond reading the medium's size; nothing
here raises on guest input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .saved_state import StateCheck, checked

CD_SECTOR = 2048
# Beyond a CD's largest capacity the profile is a DVD, as QEMU decides (CD_MAX_SECTORS).
CD_MAX_SECTORS = 80 * 60 * 75
MSF_OFFSET = 150        # the 2-second pre-gap before LBA 0

# SCSI opcodes
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
INQUIRY = 0x12
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
SEEK_10 = 0x2B
WRITE_AND_VERIFY_10 = 0x2E
READ_TOC = 0x43
GET_CONFIGURATION = 0x46
GET_EVENT_STATUS_NOTIFICATION = 0x4A
READ_DISC_INFORMATION = 0x51
MODE_SENSE_10 = 0x5A
READ_12 = 0xA8
WRITE_12 = 0xAA
SET_CD_SPEED = 0xBB
WRITE_6 = 0x0A
WRITE_OPCODES = frozenset({WRITE_6, WRITE_10, WRITE_12, WRITE_AND_VERIFY_10})

# sense keys and additional sense codes (SPC-3 4.5.6, annex D)
NO_SENSE = 0x00
NOT_READY = 0x02
MEDIUM_ERROR = 0x03
ILLEGAL_REQUEST = 0x05
UNIT_ATTENTION = 0x06
DATA_PROTECT = 0x07
ASC_UNRECOVERED_READ_ERROR = 0x11
ASC_INVALID_OPCODE = 0x20
ASC_LBA_OUT_OF_RANGE = 0x21
ASC_INVALID_FIELD_IN_CDB = 0x24
ASC_WRITE_PROTECTED = 0x27
ASC_MEDIUM_MAY_HAVE_CHANGED = 0x28
ASC_MEDIUM_NOT_PRESENT = 0x3A
ASC_MEDIUM_REMOVAL_PREVENTED = 0x53

PROFILE_NONE = 0x0000
PROFILE_CD_ROM = 0x0008
PROFILE_DVD_ROM = 0x0010

# Commands a unit attention does not fail (SPC-3 5.9.8 lists INQUIRY and REQUEST
# SENSE; MMC adds GET CONFIGURATION and GET EVENT STATUS NOTIFICATION, which the
# host uses to find out about the change in the first place).
_PASS_UNIT_ATTENTION = frozenset({INQUIRY, REQUEST_SENSE, GET_CONFIGURATION, GET_EVENT_STATUS_NOTIFICATION})
# Commands that need no medium.
_NO_MEDIUM_NEEDED = _PASS_UNIT_ATTENTION | {START_STOP_UNIT, PREVENT_ALLOW_MEDIUM_REMOVAL, MODE_SENSE_10,
                                           SET_CD_SPEED}


@dataclass(frozen=True)
class AtapiReply:
    """What a good command transfers to the host: ``data`` made here, then
    ``medium_length`` bytes of the medium from ``medium_offset`` (a read)."""

    data: bytes = b""
    medium_offset: int = 0
    medium_length: int = 0

    @property
    def length(self) -> int:
        return len(self.data) + self.medium_length


@dataclass(frozen=True)
class AtapiState:
    """An ATAPI CD-ROM's saved state: its sense data, the tray and lock, pending medium events."""

    sense_key: int
    asc: int
    ascq: int
    unit_attention: bool    # a medium change the host has not been told of
    media_event: bool       # a new-medium event GET EVENT STATUS has not reported
    locked: bool            # PREVENT MEDIUM REMOVAL
    tray_open: bool         # the guest ejected (START STOP UNIT): the disc is out of reach

    def validate(self) -> None:
        check = StateCheck(self)
        check.integer("sense_key", self.sense_key, 0, 0xF)
        check.integer("asc", self.asc, 0, 0xFF)
        check.integer("ascq", self.ascq, 0, 0xFF)
        for name in ("unit_attention", "media_event", "locked", "tray_open"):
            check.flag(name, getattr(self, name))


class CheckCondition(Exception):
    def __init__(self, key: int, asc: int, ascq: int = 0) -> None:
        super().__init__(f"sense {key:#x}/{asc:#04x}/{ascq:#04x}")
        self.key, self.asc, self.ascq = key, asc, ascq


def _msf(lba: int) -> bytes:
    frames = lba + MSF_OFFSET
    return bytes((0, frames // (75 * 60) & 0xFF, frames // 75 % 60, frames % 75))


def _padded(text: str, length: int) -> bytes:
    return text.encode("ascii")[:length].ljust(length, b" ")


class AtapiCdrom:
    """The SCSI side of one ATAPI CD/DVD-ROM drive.

    medium: an open BlockDriver (None: no disc in the tray); only its ``size`` is
      read here; the IDE layer reads the sectors a reply names.
    """

    def __init__(self, medium=None, name: str = "cdrom") -> None:
        self.name = name
        self.medium = medium
        self.sense = (NO_SENSE, 0, 0)
        self.unit_attention = False
        self.media_event = medium is not None
        self.locked = False
        self.tray_open = False

    # the disc ----------------------------------------------------------------------

    @property
    def present(self) -> bool:
        """A disc the drive can read: in it, with the tray closed."""
        return self.medium is not None and not self.tray_open

    @property
    def sectors(self) -> int:
        return self.medium.size // CD_SECTOR if self.present else 0

    def change_medium(self, medium) -> None:
        """A disc inserted or taken out (the monitor's change/eject): the host is
        told by a unit attention on its next command, as a real drive does."""
        self.medium = medium
        self.tray_open = medium is None     # an eject leaves the tray open; a change closes it
        self.unit_attention = True
        self.media_event = True

    def reset(self) -> None:
        self.sense = (NO_SENSE, 0, 0)
        self.locked = False
        self.tray_open = False      # as QEMU's reset closes it

    # saved state -------------------------------------------------------------------

    def state(self) -> AtapiState:
        return AtapiState(*self.sense, unit_attention=self.unit_attention, media_event=self.media_event,
                          locked=self.locked, tray_open=self.tray_open)

    def restore(self, state: AtapiState) -> None:
        state = checked(state, AtapiState)
        self.sense = (state.sense_key, state.asc, state.ascq)
        self.unit_attention = state.unit_attention
        self.media_event = state.media_event
        self.locked = state.locked
        self.tray_open = state.tray_open

    # commands ----------------------------------------------------------------------

    def fail(self, key: int, asc: int, ascq: int = 0) -> None:
        """A failure found outside execute (a host read error): kept for REQUEST SENSE."""
        self.sense = (key, asc, ascq)

    def execute(self, cdb: bytes) -> AtapiReply | None:
        """Run one command; None is CHECK CONDITION (``self.sense`` says why)."""
        cdb = bytes(cdb[:12]).ljust(12, b"\0")
        opcode = cdb[0]
        try:
            if self.unit_attention and opcode not in _PASS_UNIT_ATTENTION:
                self.unit_attention = False
                raise CheckCondition(UNIT_ATTENTION, ASC_MEDIUM_MAY_HAVE_CHANGED)
            if not self.present and opcode not in _NO_MEDIUM_NEEDED:
                # ASCQ 2: tray open, 1: tray closed (SPC-3 annex D)
                raise CheckCondition(NOT_READY, ASC_MEDIUM_NOT_PRESENT, 2 if self.tray_open else 1)
            handler = _HANDLERS.get(opcode)
            if handler is None:
                if opcode in WRITE_OPCODES:
                    raise CheckCondition(DATA_PROTECT, ASC_WRITE_PROTECTED)
                raise CheckCondition(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
            reply = handler(self, cdb)
        except CheckCondition as e:
            self.sense = (e.key, e.asc, e.ascq)
            return None
        if opcode != REQUEST_SENSE:
            self.sense = (NO_SENSE, 0, 0)
        return reply

    def _test_unit_ready(self, cdb: bytes) -> AtapiReply:
        return AtapiReply()

    def _request_sense(self, cdb: bytes) -> AtapiReply:
        key, asc, ascq = self.sense
        if self.unit_attention:
            key, asc, ascq = UNIT_ATTENTION, ASC_MEDIUM_MAY_HAVE_CHANGED, 0
            self.unit_attention = False
        data = bytearray(18)
        data[0] = 0x70              # current error, fixed format
        data[2] = key
        data[7] = 10                # additional sense length
        data[12], data[13] = asc, ascq
        self.sense = (NO_SENSE, 0, 0)
        return AtapiReply(bytes(data[:cdb[4]]))

    def _inquiry(self, cdb: bytes) -> AtapiReply:
        if cdb[1] & 1:          # vital product data pages: none
            raise CheckCondition(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        data = (bytes((0x05, 0x80, 0x00, 0x21, 31, 0, 0, 0))       # CD-ROM, removable, ATAPI
                + _padded("KVMPY", 8) + _padded("KVMPY DVD-ROM", 16) + _padded("1.0", 4))
        return AtapiReply(data[:struct.unpack_from(">H", cdb, 3)[0]])

    def _read_capacity(self, cdb: bytes) -> AtapiReply:
        return AtapiReply(struct.pack(">II", max(self.sectors - 1, 0), CD_SECTOR))

    def _read(self, cdb: bytes) -> AtapiReply:
        lba = struct.unpack_from(">I", cdb, 2)[0]
        count = struct.unpack_from(">H", cdb, 7)[0] if cdb[0] == READ_10 else struct.unpack_from(">I", cdb, 6)[0]
        if lba > self.sectors or count > self.sectors - lba:
            raise CheckCondition(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        return AtapiReply(medium_offset=lba * CD_SECTOR, medium_length=count * CD_SECTOR)

    def _seek(self, cdb: bytes) -> AtapiReply:
        if struct.unpack_from(">I", cdb, 2)[0] >= self.sectors:
            raise CheckCondition(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        return AtapiReply()

    def _read_toc(self, cdb: bytes) -> AtapiReply:
        msf = bool(cdb[1] & 2)
        fmt = cdb[2] & 0xF or cdb[9] >> 6      # SFF-8020 put the format in the control byte
        start_track = cdb[6]
        alloc = struct.unpack_from(">H", cdb, 7)[0]

        def address(lba: int) -> bytes:
            return _msf(lba) if msf else struct.pack(">I", lba)
        if fmt == 0:
            if start_track > 1 and start_track != 0xAA:
                raise CheckCondition(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
            body = b""
            if start_track <= 1:
                body += bytes((0, 0x14, 1, 0)) + address(0)                 # data track 1
            body += bytes((0, 0x16, 0xAA, 0)) + address(self.sectors)       # the lead-out
            data = struct.pack(">HBB", len(body) + 2, 1, 1) + body
        elif fmt == 1:      # multi-session information: one session, starting at track 1
            data = struct.pack(">HBB", 10, 1, 1) + bytes((0, 0x14, 1, 0)) + address(0)
        else:
            raise CheckCondition(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        return AtapiReply(data[:alloc])

    def _mode_sense(self, cdb: bytes) -> AtapiReply:
        page = cdb[2] & 0x3F
        control = cdb[2] >> 6
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        if control == 3:    # saved values: none are saved
            raise CheckCondition(ILLEGAL_REQUEST, 0x39)
        error_recovery = bytes((0x01, 0x06, 0x00, 0x05, 0, 0, 0, 0))
        # MM capabilities: reads CD-R/RW and DVD-ROM, eject, lock, tray loader; no writing
        capabilities = bytes((0x2A, 0x12, 0x3B, 0x00, 0x71, 0x73, 0x29 | (2 if self.locked else 0), 0x00,
                              0x02, 0xC2, 0x00, 0x02, 0x02, 0x00, 0x02, 0xC2, 0, 0, 0, 0))
        pages = {0x01: error_recovery, 0x2A: capabilities, 0x3F: error_recovery + capabilities}
        if page not in pages:
            raise CheckCondition(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        body = pages[page]
        medium_type = 0x70 if not self.present else 0x01      # "door open" / 120 mm data disc
        data = struct.pack(">HB5x", len(body) + 6, medium_type) + body
        return AtapiReply(data[:alloc])

    def _profile(self) -> int:
        if not self.present:
            return PROFILE_NONE
        return PROFILE_DVD_ROM if self.sectors > CD_MAX_SECTORS else PROFILE_CD_ROM

    def _get_configuration(self, cdb: bytes) -> AtapiReply:
        rt = cdb[1] & 3
        if rt == 3:
            raise CheckCondition(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        start = struct.unpack_from(">H", cdb, 2)[0]
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        current = self._profile()
        features = b""
        if start == 0:      # the profile list: DVD-ROM and CD-ROM, the present one current
            profiles = b"".join(struct.pack(">HBx", p, 1 if p == current else 0)
                                for p in (PROFILE_DVD_ROM, PROFILE_CD_ROM))
            features += struct.pack(">HBB", 0x0000, 0x03, len(profiles)) + profiles
        # rt 2 asks for the one feature ``start``, rt 0/1 for every one from it on
        if (start == 1) if rt == 2 else (start <= 1):      # core: ATAPI is the transport
            features += struct.pack(">HBBI", 0x0001, 0x0B, 4, 2)
        data = struct.pack(">I2xH", len(features) + 4, current) + features
        return AtapiReply(data[:alloc])

    def _get_event_status(self, cdb: bytes) -> AtapiReply:
        if not cdb[1] & 1:          # asynchronous notification: not offered
            raise CheckCondition(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        media_class = 1 << 4
        if cdb[4] & media_class:
            event = 0
            if self.media_event:
                event = 2 if self.present else 3                # new media / media removal
                self.media_event = False
            # media present, tray open
            status = (2 if self.medium is not None else 0) | (1 if self.tray_open else 0)
            data = struct.pack(">HBB", 6, 4, media_class) + bytes((event, status, 0, 0))
        else:       # no event of the classes asked for
            data = struct.pack(">HBB", 2, 0x80, media_class)
        return AtapiReply(data[:alloc])

    def _read_disc_information(self, cdb: bytes) -> AtapiReply:
        if cdb[1] & 7:          # only standard disc information
            raise CheckCondition(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        data = bytearray(34)
        struct.pack_into(">H", data, 0, 32)
        data[2] = 0x0E          # last session complete, disc finalized
        data[3] = 1             # first track
        data[4] = 1             # sessions
        data[5] = data[6] = 1   # first and last track of the last session
        data[7] = 0x20          # unrestricted use
        struct.pack_into(">I", data, 16, 0xFFFFFFFF)     # no next session
        struct.pack_into(">I", data, 20, 0xFFFFFFFF)
        return AtapiReply(bytes(data[:alloc]))

    def _start_stop_unit(self, cdb: bytes) -> AtapiReply:
        load_eject, start = cdb[4] & 2, cdb[4] & 1
        if load_eject and not start:
            if self.locked:
                raise CheckCondition(ILLEGAL_REQUEST, ASC_MEDIUM_REMOVAL_PREVENTED, 2)
            self.tray_open = True       # the disc stays in the tray, out of reach
            self.media_event = True
        elif load_eject and start and self.tray_open:
            self.tray_open = False
            self.media_event = True
        return AtapiReply()

    def _prevent_allow(self, cdb: bytes) -> AtapiReply:
        self.locked = bool(cdb[4] & 1)
        return AtapiReply()

    def _set_cd_speed(self, cdb: bytes) -> AtapiReply:
        return AtapiReply()


_HANDLERS = {
    TEST_UNIT_READY: AtapiCdrom._test_unit_ready,
    REQUEST_SENSE: AtapiCdrom._request_sense,
    INQUIRY: AtapiCdrom._inquiry,
    READ_CAPACITY: AtapiCdrom._read_capacity,
    READ_10: AtapiCdrom._read,
    READ_12: AtapiCdrom._read,
    SEEK_10: AtapiCdrom._seek,
    READ_TOC: AtapiCdrom._read_toc,
    MODE_SENSE_10: AtapiCdrom._mode_sense,
    GET_CONFIGURATION: AtapiCdrom._get_configuration,
    GET_EVENT_STATUS_NOTIFICATION: AtapiCdrom._get_event_status,
    READ_DISC_INFORMATION: AtapiCdrom._read_disc_information,
    START_STOP_UNIT: AtapiCdrom._start_stop_unit,
    PREVENT_ALLOW_MEDIUM_REMOVAL: AtapiCdrom._prevent_allow,
    SET_CD_SPEED: AtapiCdrom._set_cd_speed,
}
