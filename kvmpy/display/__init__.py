"""The VMM's display side: the VGA's picture (render), screendumps, the VNC server and keymaps."""
