"""User-mode networking (QEMU's ``-nic user``): ``options`` parses QEMU's spelling of
its options (no native code), ``slirp`` is the virtio-net backend over libslirp
(the cffi module ``_slirp_cffi``, built from ``_slirp_build.py``)."""
