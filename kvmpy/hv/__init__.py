"""The accelerators, side by side: KVM (``hv.kvm``) and the C translator (``hv.tcg``).

``protocol`` declares what the rest of kvmpy may ask of either, ``exits`` and
``regs`` are the vCPU run protocol and register state both speak, and ``select``
picks one for the host. This file imports nothing, so that importing
``kvmpy.hv.regs`` (the boot loader does) loads neither accelerator.
"""
