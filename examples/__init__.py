"""Examples shipped with the source tree (vm.toml files, device plug-ins); not part of the kvmpy package."""
