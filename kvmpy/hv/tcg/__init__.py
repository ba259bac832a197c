"""The translator: ``TcgVcpu`` over the C extension kvmpy._tcg, and the accelerator
that adds the interrupt controllers and timers KVM would keep in the kernel."""
