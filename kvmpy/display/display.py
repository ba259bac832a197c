"""The machine's screen, keyboard and pointer as the VNC server and the monitors use them.

``Display`` ties the VGA's picture (kvmpy.display.render) to the host's input
(the i8042's keyboard and PS/2 mouse). Rendering happens on the caller's thread
(the event loop for VNC, a monitor thread for screendump) under one lock; the
vCPUs keep writing video memory meanwhile, so a picture may mix two moments of a
frame, as a real scan-out does.
"""

from __future__ import annotations

import threading
import time

from ..devices.vga import Vga
from .render import Renderer, Surface


CLEAN = "clean"
DIRTY = "dirty"


class Display:
    def __init__(self, vga: Vga, keyboard, events=None, font=None) -> None:
        """``keyboard``: an object with ``press_key(number, down)`` and
        ``mouse_event(dx, dy, dz, buttons)`` (kvmpy.devices.i8042.I8042)."""
        self.vga = vga
        self.keyboard = keyboard
        self.events = events
        self.renderer = Renderer(vga, font)
        self._lock = threading.Lock()
        self._surface: Surface | None = None
        self._generation = -1
        self._content: bytes | None = None
        self.serial = 0          # bumped whenever the picture changed
        self._pointer = None
        self.vnc = None          # the VNC server, when one runs

    def _source(self):
        """What the picture is made of, cheaply comparable: the registers' generation
        and the memory the mode shows: CLEAN where KVM's dirty log says no page of
        the framebuffer was written, DIRTY where it says some were, else the bytes."""
        vga = self.vga
        if vga.vbe_enabled:
            dirty = vga.dirty_framebuffer_pages()
            if dirty is not None:
                return vga.generation, DIRTY if any(dirty) else CLEAN
            start = vga.vbe_start()
            size = vga.vbe_line_offset() * vga.vbe[2]
            return vga.generation, bytes(vga.vram[start:start + size])
        return vga.generation, bytes(vga.legacy)

    def refresh(self) -> tuple[Surface, bool]:
        """The current picture and whether it changed since the last refresh."""
        with self._lock:
            generation, content = self._source()
            if self._surface is not None and generation == self._generation and content is not DIRTY \
                    and (content is CLEAN or content == self._content):
                return self._surface, False
            surface = self.renderer.render()
            changed = self._surface is None or surface.width != self._surface.width \
                or surface.height != self._surface.height or surface.data != self._surface.data
            self._surface = surface
            self._generation = generation
            self._content = content if isinstance(content, bytes) else None
            if changed:
                self.serial += 1
            return surface, changed

    def surface(self) -> Surface:
        """The picture now (screendump)."""
        with self._lock:
            self._surface = None           # force a render: screendump must show this moment
        return self.refresh()[0]

    # --- input ------------------------------------------------------------------------
    def press_key(self, number: int, down: bool) -> None:
        self.keyboard.press_key(number, down)

    def send_keys(self, numbers: list[int], hold_ms: int = 100) -> None:
        """HMP sendkey / QMP send-key: press in order, release in reverse after ``hold_ms``."""
        for number in numbers:
            self.keyboard.press_key(number, True)

        def release() -> None:
            for number in reversed(numbers):
                self.keyboard.press_key(number, False)
        if self.events is not None and hold_ms > 0:
            self.events.call_later(hold_ms / 1000.0, release)
        else:
            if hold_ms > 0:
                time.sleep(hold_ms / 1000.0)
            release()

    def pointer(self, x: int, y: int, buttons: int, wheel: int = 0) -> None:
        """An absolute position from a viewer, as relative PS/2 motion (y grows down
        on the screen and up for PS/2). ``buttons``: bit 0 left, 1 middle, 2 right (RFB's)."""
        if self._pointer is None:
            self._pointer = (x, y)
        last_x, last_y = self._pointer
        self._pointer = (x, y)
        ps2_buttons = (buttons & 1) | ((buttons & 4) >> 1) | ((buttons & 2) << 1)
        self.keyboard.mouse_event(x - last_x, last_y - y, wheel, ps2_buttons)
