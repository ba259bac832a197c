"""Tools shipped beside the VMM, not part of it: `kvmpy guest build` (guestbuild) and
`kvmpy selftest nested` (nested). Only kvmpy.cli reaches them, by name, when one of
their commands runs, so a VM process never loads Debian packaging or the L1 harness.
"""
