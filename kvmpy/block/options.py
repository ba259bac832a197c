"""Sizes and -o options with qemu-img's spelling, shared by every `kvmpy img` subcommand."""

from __future__ import annotations

import re

from ..errors import UserError

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
             "e": 1 << 60}
_SIZE_RE = re.compile(r"^([+-]?)(\d+(?:\.\d+)?)([bkmgtpe]?)(?:i?b)?$", re.IGNORECASE)


def parse_size(text: str, what: str = "size", allow_sign: bool = False):
    """'4G', '512M', '1024', '1.5G' -> bytes; with allow_sign returns (sign, bytes)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise UserError(f"invalid {what} {text!r} (use e.g. 1024, 512M, 4G)")
    sign, num, suffix = m.groups()
    if sign and not allow_sign:
        raise UserError(f"invalid {what} {text!r}: a sign is only allowed for resize")
    value = float(num) * _SUFFIXES[suffix.lower()] if "." in num else int(num) * _SUFFIXES[suffix.lower()]
    value = int(value)
    if value > (1 << 63) - 1:
        raise UserError(f"invalid {what} {text!r}: too large")
    return (sign, value) if allow_sign else value


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        n /= 1024
        if n < 1024 or unit == "EiB":
            s = f"{n:.3g}"
            return f"{s} {unit}"
    return f"{n} B"


def parse_options(opts: list[str]) -> dict:
    out = {}
    for group in opts or []:
        for item in group.split(","):
            if not item:
                continue
            if "=" not in item:
                raise UserError(f"invalid -o option {item!r} (expected key=value)")
            k, v = item.split("=", 1)
            out[k.strip().replace("-", "_")] = v.strip()
    return out


def _onoff(key, v) -> bool:
    if v in ("on", "true", "yes"):
        return True
    if v in ("off", "false", "no"):
        return False
    raise UserError(f"invalid value {v!r} for -o {key} (on/off)")
