"""Device plug-ins living outside the kvmpy package, each a VirtioDevice (kvmpy/devices/virtio/device.py)."""
