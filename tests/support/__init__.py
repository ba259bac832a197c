"""Test scaffolding shared by kvmpy's tests (never shipped in the package)."""
