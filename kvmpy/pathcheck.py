"""What kind of file a user named, checked before anything opens it.

Opening a FIFO for reading blocks until a writer appears, and reading a
character device such as /dev/zero never ends; a directory gives a confusing
"no such file" or an IsADirectoryError traceback further on. So every path a
user hands kvmpy as a file (kernel, initrd, vm.toml, disk images) is stat()ed
first, and anything but the expected kind is one line naming the path.
"""

from __future__ import annotations

import os
import stat

from .errors import UserError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def describe_mode(mode: int) -> str:
    for test, text in _KINDS:
        if test(mode):
            return text
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def refuse_special_file(path: str, prefix: str, error: type[UserError] = UserError, *,
                        allow_block_device: bool = False, allow_fifo: bool = False) -> os.stat_result | None:
    """Raise ``error("PREFIX: is a directory, ...")`` unless ``path`` is a regular file
    (or a block device / FIFO where the caller allows one). Returns the stat result,
    or None when the path does not exist: the caller's own open reports that in
    its own words."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise error(f"{prefix}: {e.strerror}") from None
    except ValueError:      # a NUL byte (only vm.toml can carry one): no file has that name
        raise error(f"{prefix}: a path cannot contain a NUL byte") from None
    mode = st.st_mode
    if (stat.S_ISREG(mode) or allow_block_device and stat.S_ISBLK(mode)
            or allow_fifo and stat.S_ISFIFO(mode)):
        return st
    wanted = "a regular file" + (" or a block device" if allow_block_device else "")
    raise error(f"{prefix}: is {describe_mode(mode)}, expected {wanted}")


def require_file(path: str, prefix: str, error: type[UserError] = UserError) -> os.stat_result:
    """A regular file that exists (kernel, initrd): otherwise one line saying why not."""
    st = refuse_special_file(path, prefix, error)
    if st is None:
        raise error(f"{prefix}: no such file")
    return st
