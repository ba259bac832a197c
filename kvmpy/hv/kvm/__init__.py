"""KVM: the /dev/kvm bindings (``api`` over the cffi module ``_build.py`` makes), the vCPU
set-up a PC BIOS would do, the Platform over irqfd/ioeventfd, and the accelerator."""
