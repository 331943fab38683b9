"""Know when another process writes a file, without polling (Linux inotify).

``DirectoryWatch(path)`` watches one directory for files written, created or
moved in, and calls ``on_change(names)`` from the event loop with the names
seen. Where inotify is missing (not Linux, or its limits are reached)
``DirectoryWatch.open`` returns None and the caller polls instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import struct
import sys
from collections.abc import Callable

__all__ = ["DirectoryWatch"]

_IN_MODIFY = 0x00000002
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1  # noqa: B018 - present?
        libc.inotify_add_watch  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


class DirectoryWatch:
    """An inotify watch on one directory, read by one event loop."""

    def __init__(self, fd: int, on_change: Callable[[set[str]], None]) -> None:
        self._fd = fd
        self._on_change = on_change
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(cls, directory: str, on_change: Callable[[set[str]], None]) -> DirectoryWatch | None:
        libc = _libc()
        if libc is None:
            return None
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return None
        mask = _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            os.close(fd)
            return None
        return cls(fd, on_change)

    def attach(self) -> None:
        """Read events in the running loop (again, when the loop changed)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self.detach()
        loop.add_reader(self._fd, self._read)
        self._loop = loop

    def detach(self) -> None:
        """Stop reading events (the kernel keeps them for the next attach)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self._loop = None

    def _read(self) -> None:
        names: set[str] = set()
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                break
            except OSError:
                self.detach()
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                _, _, _, size = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + size]
                names.add(os.fsdecode(raw.rstrip(b"\0")))
                offset += _EVENT.size + size
        if names:
            self._on_change(names)

    def close(self) -> None:
        self.detach()
        with contextlib.suppress(OSError):
            os.close(self._fd)
