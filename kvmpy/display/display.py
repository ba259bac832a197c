"""The machine's screen, keyboard and pointer as the VNC server and the monitors use them.

``Display`` ties the VGA's picture (kvmpy.display.render) to the host's input
(the i8042's keyboard and PS/2 mouse). Rendering happens on the caller's thread
(the event loop for VNC, a monitor thread for screendump) under one lock; the
vCPUs keep writing video memory meanwhile, so a picture may mix two moments of a
frame, as a real scan-out does.
"""

from __future__ import annotations

import collections
import threading
import time

from ..devices.vga import Vga
from .render import Renderer, Surface
from .screendump import write_screendump


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
        self.vnc = None
        self._keys: collections.deque = collections.deque()     # monitor key events, in order
        self._keys_lock = threading.Lock()
        self._keys_pumping = False          # the VNC server, when one runs

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

    def screendump(self, filename: str, fmt: str = "ppm") -> None:
        """The picture now into ``filename`` (PPM or PNG); OSError as the host gives it."""
        write_screendump(self.surface(), filename, fmt)

    # --- input ------------------------------------------------------------------------
    def press_key(self, number: int, down: bool) -> None:
        self.keyboard.press_key(number, down)

    def send_keys(self, numbers: list[int], hold_ms: int = 100) -> None:
        """HMP sendkey / QMP send-key: press in order, release in reverse after ``hold_ms``.
        Commands queue behind each other, as QEMU's do: a second sendkey's keys come
        after the first one's releases."""
        with self._keys_lock:
            self._keys.extend((number, True) for number in numbers)
            self._keys.append(("hold", hold_ms / 1000.0))
            self._keys.extend((number, False) for number in reversed(numbers))
            start = not self._keys_pumping
            self._keys_pumping = True
        if start:
            if self.events is not None:
                self.events.call_soon(self._pump_keys)
            else:
                self._pump_keys()

    def _pump_keys(self) -> None:
        while True:
            with self._keys_lock:
                if not self._keys:
                    self._keys_pumping = False
                    return
                item, value = self._keys.popleft()
            if item == "hold":
                if value > 0:
                    if self.events is not None:
                        self.events.call_later(value, self._pump_keys)
                        return
                    time.sleep(value)
                continue
            self.keyboard.press_key(item, value)

    def pointer(self, x: int, y: int, buttons: int, wheel: int = 0) -> None:
        """An absolute position from a viewer, as relative PS/2 motion (y grows down
        on the screen and up for PS/2). ``buttons``: bit 0 left, 1 middle, 2 right (RFB's)."""
        if self._pointer is None:
            self._pointer = (x, y)
        last_x, last_y = self._pointer
        self._pointer = (x, y)
        ps2_buttons = (buttons & 1) | ((buttons & 4) >> 1) | ((buttons & 2) << 1)
        self.keyboard.mouse_event(x - last_x, last_y - y, wheel, ps2_buttons)
