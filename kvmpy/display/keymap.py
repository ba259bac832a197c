"""Keyboard layouts: which PC key a viewer's keysym is, as QEMU's ``-k`` maps it.

The layouts are QEMU's own keymap files (GPL-2 data of QEMU's, read at run time
from /usr/share/qemu/keymaps or ``[display] keymaps``, never copied into kvmpy):
lines ``KEYSYM-NAME NUMBER [shift] [altgr] [numlock] [addupper] [localstate]...``
where NUMBER is QEMU's key number: the set-1 scancode, 0x80 added for the keys
that send an 0xE0 prefix. Keysym names become numbers through X11's keysymdef.h
where the host has it (x11proto-dev), else through the built-in names below
(ASCII, Latin-1 by Unicode name, the function and editing keys).

A keysym the layout has several keys for (the same character on two keys, or
with and without shift) goes to the entry whose modifiers match what the viewer
holds down; the viewer sends its modifier keys itself, so only the key is pressed.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass

from ..errors import ConfigError

KEYMAP_DIRS = ("/usr/share/qemu/keymaps", "/usr/local/share/qemu/keymaps")
KEYSYMDEF = "/usr/include/X11/keysymdef.h"
MAX_INCLUDE_DEPTH = 8

# Keysyms of the keys that are not characters (X11's numbers, the RFB protocol's).
BUILTIN_KEYSYMS = {
    "BackSpace": 0xFF08, "Tab": 0xFF09, "Return": 0xFF0D, "Escape": 0xFF1B, "Delete": 0xFFFF,
    "Home": 0xFF50, "Left": 0xFF51, "Up": 0xFF52, "Right": 0xFF53, "Down": 0xFF54, "Prior": 0xFF55,
    "Page_Up": 0xFF55, "Next": 0xFF56, "Page_Down": 0xFF56, "End": 0xFF57, "Insert": 0xFF63,
    "Print": 0xFF61, "Pause": 0xFF13, "Scroll_Lock": 0xFF14, "Sys_Req": 0xFF15, "Menu": 0xFF67,
    "Num_Lock": 0xFF7F, "KP_Enter": 0xFF8D, "KP_Multiply": 0xFFAA, "KP_Add": 0xFFAB, "KP_Subtract": 0xFFAD,
    "KP_Decimal": 0xFFAE, "KP_Divide": 0xFFAF, "KP_Separator": 0xFFAC, "KP_Home": 0xFF95, "KP_Left": 0xFF96,
    "KP_Up": 0xFF97, "KP_Right": 0xFF98, "KP_Down": 0xFF99, "KP_Prior": 0xFF9A, "KP_Next": 0xFF9B,
    "KP_End": 0xFF9C, "KP_Begin": 0xFF9D, "KP_Insert": 0xFF9E, "KP_Delete": 0xFF9F,
    "Shift_L": 0xFFE1, "Shift_R": 0xFFE2, "Control_L": 0xFFE3, "Control_R": 0xFFE4, "Caps_Lock": 0xFFE5,
    "Meta_L": 0xFFE7, "Meta_R": 0xFFE8, "Alt_L": 0xFFE9, "Alt_R": 0xFFEA, "Super_L": 0xFFEB,
    "Super_R": 0xFFEC, "ISO_Level3_Shift": 0xFE03, "Mode_switch": 0xFF7E, "ISO_Left_Tab": 0xFE20,
    **{f"F{i}": 0xFFBD + i for i in range(1, 25)},
    **{f"KP_{i}": 0xFFB0 + i for i in range(10)},
    "space": 0x20, "exclam": 0x21, "quotedbl": 0x22, "numbersign": 0x23, "dollar": 0x24, "percent": 0x25,
    "ampersand": 0x26, "apostrophe": 0x27, "parenleft": 0x28, "parenright": 0x29, "asterisk": 0x2A,
    "plus": 0x2B, "comma": 0x2C, "minus": 0x2D, "period": 0x2E, "slash": 0x2F, "colon": 0x3A,
    "semicolon": 0x3B, "less": 0x3C, "equal": 0x3D, "greater": 0x3E, "question": 0x3F, "at": 0x40,
    "bracketleft": 0x5B, "backslash": 0x5C, "bracketright": 0x5D, "asciicircum": 0x5E, "underscore": 0x5F,
    "grave": 0x60, "braceleft": 0x7B, "bar": 0x7C, "braceright": 0x7D, "asciitilde": 0x7E,
    "nobreakspace": 0xA0, "ssharp": 0xDF, "EuroSign": 0x20AC,
}
# The modifier keysyms and which modifier each holds.
MODIFIER_KEYSYMS = {0xFFE1: "shift", 0xFFE2: "shift", 0xFE03: "altgr", 0xFF7E: "altgr", 0xFFEA: "altgr_r",
                    0xFFE3: "ctrl", 0xFFE4: "ctrl"}
_DEFINE = re.compile(r"^#define XK_([A-Za-z0-9_]+)\s+0x([0-9a-fA-F]+)")


@dataclass(frozen=True)
class KeyEntry:
    """The key a character is typed with in a keymap: QEMU's key number and modifiers."""

    number: int            # QEMU's key number (set 1, +0x80 for E0 keys)
    shift: bool
    altgr: bool


_keysyms: dict[str, int] | None = None


def keysym_names() -> dict[str, int]:
    global _keysyms
    if _keysyms is None:
        table = dict(BUILTIN_KEYSYMS)
        try:
            with open(KEYSYMDEF, encoding="latin-1") as f:
                for line in f:
                    m = _DEFINE.match(line)
                    if m:
                        table.setdefault(m.group(1), int(m.group(2), 16))
        except OSError:
            pass
        _keysyms = table
    return _keysyms


def keysym_value(name: str) -> int | None:
    """A keysym name's number: the table, ``U20AC`` style Unicode names, single
    characters, and Latin-1 letters by their Unicode names (``adiaeresis``)."""
    table = keysym_names()
    if name in table:
        return table[name]
    if re.fullmatch(r"U[0-9A-Fa-f]{4,6}", name):
        code = int(name[1:], 16)
        return code if code < 0x100 else 0x01000000 | code
    if len(name) == 1:
        return ord(name)
    m = re.fullmatch(r"([a-zA-Z])(acute|grave|circumflex|diaeresis|tilde|ring|cedilla)", name)
    if m:
        accent = {"ring": "RING ABOVE"}.get(m.group(2), m.group(2).upper())
        case = "SMALL" if m.group(1).islower() else "CAPITAL"
        try:
            return ord(unicodedata.lookup(f"LATIN {case} LETTER {m.group(1).upper()} WITH {accent}"))
        except KeyError:
            return None
    return None


def find_keymap(name: str, directory: str | None, where: str) -> str:
    """The keymap file for layout ``name``; ConfigError naming ``where`` if there is none."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
        raise ConfigError(f"{where}: {name!r} is not a keymap name (such as de, fr, en-us)")
    dirs = (directory,) if directory else KEYMAP_DIRS
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"{where}: no keymap {name!r} in {', '.join(dirs)} (QEMU's keymaps: Debian's qemu-system-data)")


class Keymap:
    """keysym -> the keys that type it, from one QEMU keymap file (and its includes)."""

    def __init__(self, name: str, directory: str | None = None) -> None:
        self.name = name
        self.entries: dict[int, list[KeyEntry]] = {}
        self._directory = directory
        self._load(find_keymap(name, directory, f"keymap {name}"), 0)

    def _load(self, path: str, depth: int) -> None:
        with open(path, encoding="utf-8", errors="replace") as f:
            for raw in f:
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                words = line.split()
                if words[0] == "include" and len(words) == 2 and depth < MAX_INCLUDE_DEPTH:
                    try:
                        self._load(find_keymap(words[1], self._directory, f"keymap {self.name}"), depth + 1)
                    except ConfigError:
                        pass
                    continue
                if words[0] == "map" or len(words) < 2:
                    continue
                keysym = keysym_value(words[0])
                try:
                    number = int(words[1], 16)
                except ValueError:
                    continue
                if keysym is None or not 0 < number < 0x100:
                    continue
                flags = set(words[2:])
                self._add(keysym, KeyEntry(number, "shift" in flags, "altgr" in flags))
                if "addupper" in flags and words[0].isalpha() and len(words[0]) == 1:
                    self._add(ord(words[0].upper()), KeyEntry(number, True, False))

    def _add(self, keysym: int, entry: KeyEntry) -> None:
        self.entries.setdefault(keysym, []).append(entry)

    def key_for(self, keysym: int, shift: bool = False, altgr: bool = False) -> int | None:
        """QEMU's key number for ``keysym`` with the viewer's modifiers, or None."""
        candidates = self.entries.get(keysym)
        if not candidates and 0x61 <= keysym <= 0x7A:
            candidates = self.entries.get(keysym - 0x20)
        if not candidates:
            return None
        for entry in candidates:
            if entry.shift == shift and entry.altgr == altgr:
                return entry.number
        for entry in candidates:
            if entry.altgr == altgr:
                return entry.number
        return candidates[0].number


# QEMU's key names (qapi QKeyCode, what HMP sendkey and QMP send-key take) -> key number.
QKEYCODES = {
    "esc": 0x01, **{str(i): 0x01 + i for i in range(1, 10)}, "0": 0x0B, "minus": 0x0C, "equal": 0x0D,
    "backspace": 0x0E, "tab": 0x0F, "q": 0x10, "w": 0x11, "e": 0x12, "r": 0x13, "t": 0x14, "y": 0x15,
    "u": 0x16, "i": 0x17, "o": 0x18, "p": 0x19, "bracket_left": 0x1A, "bracket_right": 0x1B, "ret": 0x1C,
    "ctrl": 0x1D, "a": 0x1E, "s": 0x1F, "d": 0x20, "f": 0x21, "g": 0x22, "h": 0x23, "j": 0x24, "k": 0x25,
    "l": 0x26, "semicolon": 0x27, "apostrophe": 0x28, "grave_accent": 0x29, "shift": 0x2A,
    "backslash": 0x2B, "z": 0x2C, "x": 0x2D, "c": 0x2E, "v": 0x2F, "b": 0x30, "n": 0x31, "m": 0x32,
    "comma": 0x33, "dot": 0x34, "slash": 0x35, "shift_r": 0x36, "kp_multiply": 0x37, "alt": 0x38,
    "spc": 0x39, "caps_lock": 0x3A, **{f"f{i}": 0x3A + i for i in range(1, 11)}, "num_lock": 0x45,
    "scroll_lock": 0x46, "kp_7": 0x47, "kp_8": 0x48, "kp_9": 0x49, "kp_subtract": 0x4A, "kp_4": 0x4B,
    "kp_5": 0x4C, "kp_6": 0x4D, "kp_add": 0x4E, "kp_1": 0x4F, "kp_2": 0x50, "kp_3": 0x51, "kp_0": 0x52,
    "kp_decimal": 0x53, "less": 0x56, "f11": 0x57, "f12": 0x58, "kp_enter": 0x9C, "ctrl_r": 0x9D,
    "kp_divide": 0xB5, "print": 0xB7, "sysrq": 0xB7, "alt_r": 0xB8, "home": 0xC7, "up": 0xC8, "pgup": 0xC9,
    "left": 0xCB, "right": 0xCD, "end": 0xCF, "down": 0xD0, "pgdn": 0xD1, "insert": 0xD2, "delete": 0xD3,
    "meta_l": 0xDB, "meta_r": 0xDC, "menu": 0xDD,
}


def parse_key_combo(spec: str) -> list[int]:
    """HMP sendkey's ``ctrl-alt-delete`` (names or 0xNN numbers) -> key numbers; ValueError names the bad one."""
    keys = []
    for name in spec.split("-"):
        if name in QKEYCODES:
            keys.append(QKEYCODES[name])
        elif re.fullmatch(r"0x[0-9a-fA-F]{1,2}", name) and 0 < int(name, 16) < 0x100:
            keys.append(int(name, 16))
        else:
            raise ValueError(f"unknown key: '{name}'")
    if not keys:
        raise ValueError("no key given")
    return keys
