"""Error types shared by every part of kvmpy.

UserError carries one line for the user (the file, key or offset that was wrong);
the CLI prints it as ``kvmpy: <message>`` and exits with status 2.
"""


class UserError(Exception):
    """Bad user input: vm.toml, command line, image files. Exit status 2."""

    exit_status = 2

    def __str__(self) -> str:
        # The message quotes what the user typed, and that may hold a newline (a path,
        # a --name, a TOML key): escape line breaks so it stays the promised one line.
        text = super().__str__()
        return text.replace("\r", "\\r").replace("\n", "\\n") if "\n" in text or "\r" in text else text


class ConfigError(UserError):
    """vm.toml or command-line overrides are invalid."""


class ImageError(UserError):
    """A disk image is malformed, missing or unsupported."""


class BootError(UserError):
    """A kernel or initrd cannot be loaded."""


class HostError(UserError):
    """The host cannot provide what was asked (guest RAM it will not map, ...):
    still one line naming the option, but exit status 1, a host fault."""

    exit_status = 1


class GuestMemoryError(Exception):
    """A guest-supplied address/length does not lie inside guest RAM.

    Raised by GuestMemory for hostile guest values; device models catch it and
    report a device error rather than letting it escape.
    """
