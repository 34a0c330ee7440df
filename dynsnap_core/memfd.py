"""Parallel memfd restoration: fill memfds from image segments with a pool of C threads, dump them back, share them.

A region is a memfd. ``restore(segments)`` creates one memfd per segment ``(file, offset, length)``
and fills it with N threads that ``pread`` straight into a shared mapping (optionally
``MADV_POPULATE_WRITE`` first, O_DIRECT for the aligned part, transparent or hugetlb huge pages),
hashing each 8 MiB chunk while it is still in cache. The region digest (``digest()``) is XXH3-64
over the chunks' XXH3-64s, so it is computed in parallel and checked before a memfd is handed out:
a mismatch raises ``SnapshotCorrupt`` and no fd escapes. ``dump()`` is the reverse.

A ``MemFd`` has its fd, size and digest, a zero-copy ``view()`` (memoryview; ``numpy()`` when numpy is
installed), and travels to another process over a Unix socket with ``send()`` / ``MemFd.receive()``
(SCM_RIGHTS). ``reserve`` / ``attach`` / ``detach`` map a memfd at a fixed address inside a PROT_NONE
reservation, so pointers into it survive a detach -> checkpoint -> restore -> re-attach cycle.

Page sizes: by default the fill mapping is 2 MiB-aligned and advised ``MADV_HUGEPAGE`` whenever the kernel
allows transparent huge pages for shmem (``shmem_thp()``: ``shmem_enabled`` advise/always/within_size/force,
or the 2 MiB size's own ``shmem_enabled`` knob), which spares the kernel allocating and zeroing 512 small
pages per 2 MiB; ``thp=False`` opts out. ``hugetlb=True`` uses MFD_HUGETLB pages reserved in
``vm.nr_hugepages`` (``hugetlb_pages()``). ``MemFd.page_kind()`` says what the pages turned out to be.

The GIL is released for every fill, dump, hash and copy. No io_uring is used (a process holding
these memfds can be checkpointed).
"""
from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from dynsnap_core._lib import load
from dynsnap_core.hugepages import THP_DIR, hugetlb_pages, shmem_thp, sysfs_selected  # noqa: F401 (memfd.*)
from dynsnap_core.memsvc.protocol import recv_message, send_message
from dynsnap_core.errors import MemfdError, SnapshotCorrupt, from_engine, oserror

_memfd = load("_memfd", "memfd engine")

__all__ = [
    "HASH_CHUNK", "MemfdError", "Segment", "MemFd", "DumpResult", "restore", "dump", "create", "digest",
    "copy", "reserve", "attach", "detach", "release", "view_at", "send_message", "recv_message",
    "debug_counters", "default_threads", "shmem_thp", "hugetlb_pages",
]

#: The region digest is defined over chunks of this many bytes.
HASH_CHUNK: int = _memfd.HASH_CHUNK
_live = {"opened": 0, "closed": 0}


def default_threads() -> int:
    """Threads used when none are given: online CPUs, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def debug_counters() -> dict:
    """C-side counters (memfds, maps, fds, threads created/freed) plus MemFd objects opened/closed here."""
    return {**_memfd.debug_counters(), "memfd_objects_opened": _live["opened"],
            "memfd_objects_closed": _live["closed"]}


def _hex(v: int) -> str:
    return f"{v:016x}"


def _unhex(s: Optional[str]) -> Optional[int]:
    return None if s is None else int(s, 16)


_translate = from_engine   # the one errno mapping (errors.from_engine)


@dataclass
class Segment:
    """Bytes ``[offset, offset + length)`` of ``path`` (``length=None``: to the end of the file).

    ``digest`` (16 hex chars, see ``digest()``) is checked after the fill when given; ``name`` names the
    memfd (``/memfd:NAME`` in /proc/PID/maps).
    """

    path: str
    offset: int = 0
    length: Optional[int] = None
    name: Optional[str] = None
    digest: Optional[str] = None


@dataclass
class DumpResult:
    """One region written by ``dump``: the file, its size and the region digest."""

    path: str
    size: int
    digest: str


class MemFd:
    """An owned memfd holding one region: ``fd``, ``size`` (content bytes), ``digest`` (hex), ``sealed``,
    ``hugetlb`` (MFD_HUGETLB pages) and ``thp`` (filled through a 2 MiB-aligned MADV_HUGEPAGE mapping;
    whether the kernel really gave huge pages: ``page_kind()``).

    Close it (or use it as a context manager) to drop this process's reference; the memory lives on
    while another process holds the fd or a mapping.
    """

    def __init__(self, fd: int, size: int, *, name: str = "dynsnap", digest: Optional[str] = None,
                 sealed: bool = False, hugetlb: bool = False, map_size: Optional[int] = None, thp: bool = False):
        self.fd = fd
        self.size = size
        self.name = name
        self.digest = digest
        self.sealed = sealed
        self.hugetlb = hugetlb
        self.thp = thp and not hugetlb
        self.map_size = map_size if map_size is not None else size
        self._maps: list[mmap.mmap] = []
        _live["opened"] += 1

    def __repr__(self) -> str:
        return (f"MemFd(fd={self.fd}, name={self.name!r}, size={self.size}, digest={self.digest!r}, "
                f"sealed={self.sealed})")

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def view(self, writable: Optional[bool] = None) -> memoryview:
        """A zero-copy memoryview of the content (read-only when sealed or ``writable=False``)."""
        if self.closed:
            raise ValueError("MemFd is closed")
        if writable is None:
            writable = not self.sealed
        if self.size == 0:
            return memoryview(b"")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        n = self._map_len()
        m = mmap.mmap(self.fd, n, mmap.MAP_SHARED, prot)
        self._maps.append(m)
        return memoryview(m) if n == self.size else memoryview(m)[:self.size]

    def _map_len(self) -> int:
        """Bytes to map: hugetlb mappings must cover whole huge pages, or munmap fails (EINVAL) and the
        mapping, with its huge pages, would outlive ``close()``."""
        return max(self.map_size, self.size) if self.hugetlb else self.size

    def numpy(self, dtype: Any = "uint8", writable: Optional[bool] = None) -> Any:
        """A zero-copy numpy array over the content (needs numpy)."""
        import numpy as np
        return np.frombuffer(self.view(writable), dtype=dtype)

    def compute_digest(self, threads: Optional[int] = None) -> str:
        """Digest of the current content, with a thread pool."""
        if self.size == 0:
            return digest(b"")
        m = mmap.mmap(self.fd, self._map_len(), mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            with memoryview(m) as v, v[:self.size] as content:
                return _hex(_memfd.hash_buffer(content, threads or default_threads()))
        finally:
            m.close()

    def huge_bytes(self) -> int:
        """Bytes of the content held in PMD-sized pages (hugetlb: all of it).

        Maps the memfd once at a 2 MiB-aligned address, reads one byte of each 2 MiB block that holds
        data (holes stay holes: nothing is allocated) and reads this mapping's ``ShmemPmdMapped`` from
        /proc/self/smaps; costs a walk of /proc/self/smaps, so it is not done on every restore.
        """
        if self.closed:
            raise ValueError("MemFd is closed")
        if self.hugetlb:
            return self.map_size
        hp = shmem_thp()["pmd_kb"] << 10
        size = self.map_size
        if size < hp:
            return 0
        base = reserve(size + hp)
        try:
            at = (base + hp - 1) // hp * hp
            attach(self.fd, at, size)
            v = view_at(at, size)
            try:
                off = 0
                while off < size:
                    try:
                        data = os.lseek(self.fd, off, os.SEEK_DATA)
                    except OSError as e:
                        if e.errno == _errno.ENXIO:   # only holes from here on
                            break
                        raise
                    hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), size)
                    for blk in range(data // hp * hp, hole, hp):
                        v[max(blk, data)]
                    off = hole
            finally:
                v.release()
            want, seen = f"{at:x}-", None
            with open("/proc/self/smaps") as f:
                for line in f:
                    if seen is None:
                        if line.startswith(want):
                            seen = 0
                    elif line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
                        seen += int(line.split()[1]) << 10
                    elif line.startswith("VmFlags:"):   # the last field of this mapping's block
                        break
            return min(seen or 0, self.size)
        finally:
            release(base, size + hp)

    def page_kind(self) -> str:
        """``'hugetlb'``, ``'thp'`` (every whole 2 MiB block of the content is a huge page), ``'4k'`` (none is)
        or ``'mixed'``; see ``huge_bytes()`` for what it costs."""
        if self.hugetlb:
            return "hugetlb"
        huge = self.huge_bytes()
        hp = shmem_thp()["pmd_kb"] << 10
        whole = self.size // hp * hp
        if huge == 0:
            return "4k"
        return "thp" if huge >= whole else "mixed"

    def seal(self) -> None:
        """Forbid writes, shrinking and growing (F_SEAL_WRITE needs no writable mapping left)."""
        import fcntl
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        except OSError as e:
            raise MemfdError(f"cannot seal memfd {self.name!r}: {e.strerror} (is a writable mapping left?)",
                             stage="seal", errno=e.errno) from None
        self.sealed = True

    def header(self) -> dict:
        """What ``send`` transmits besides the fd."""
        return {"name": self.name, "size": self.size, "digest": self.digest, "sealed": self.sealed,
                "hugetlb": self.hugetlb, "map_size": self.map_size}

    def send(self, sock: socket.socket, extra: Optional[dict] = None) -> None:
        """Send the fd and its description over a Unix socket (SCM_RIGHTS)."""
        send_message(sock, {**(extra or {}), "memfd": self.header()}, [self.fd])

    @classmethod
    def receive(cls, sock: socket.socket) -> tuple["MemFd", dict]:
        """Receive a MemFd sent with ``send``; returns it and the whole message."""
        msg, fds = recv_message(sock)
        if not fds or "memfd" not in msg:
            for fd in fds:
                os.close(fd)
            raise MemfdError(f"expected a memfd message, got {msg!r}", stage="receive")
        for fd in fds[1:]:
            os.close(fd)
        return cls.from_message(msg["memfd"], fds[0]), msg

    @classmethod
    def from_message(cls, h: dict, fd: int) -> "MemFd":
        return cls(fd, h["size"], name=h.get("name", "dynsnap"), digest=h.get("digest"),
                   sealed=h.get("sealed", False), hugetlb=h.get("hugetlb", False), map_size=h.get("map_size"))

    def close(self) -> None:
        """Unmap this object's views (when no buffer still uses them) and close the fd."""
        for m in self._maps:
            try:
                m.close()
            except BufferError:   # a memoryview is still alive; the mapping goes with it
                pass
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _live["closed"] += 1

    def __enter__(self) -> "MemFd":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _flags(*, hugetlb: bool = False, thp: bool = False, populate: bool = False, seal: bool = False,
           direct: bool = False, fsync: bool = False) -> int:
    f = 0
    for on, bit in ((hugetlb, _memfd.HUGETLB), (thp, _memfd.THP), (populate, _memfd.POPULATE),
                    (seal, _memfd.SEAL), (direct, _memfd.DIRECT), (fsync, _memfd.FSYNC)):
        if on:
            f |= bit
    return f


def restore(segments: Iterable[Segment | tuple], threads: Optional[int] = None, *, hugetlb: bool = False,
            thp: Optional[bool] = None, populate: Optional[bool] = None, seal: bool = False, direct: bool = False,
            chunk_size: int = 0, block_size: int = 0) -> list[MemFd]:
    """Create one memfd per segment and fill them all with ``threads`` threads (default: CPUs, <= 16).

    Segments are ``Segment`` objects or ``(path, offset, length)`` tuples. Raises ``SnapshotCorrupt`` for
    a segment beyond the end of its file, a file that shrinks while read, or a digest mismatch;
    ``thp=None`` (default) advises transparent huge pages when ``shmem_thp()`` says the kernel allows them,
    ``thp=True`` always does (harmless when not allowed), ``thp=False`` never; ``hugetlb=True`` uses hugetlb
    pages (and no THP) and raises ``MemfdError`` when ``vm.nr_hugepages`` has too few free ones;
    ``populate=None`` (default) pre-faults each unit with MADV_POPULATE_WRITE for 4 KiB pages only;
    ``MemfdError`` when memfds or hugetlb pages are unavailable; ``OSError`` for I/O errors. On any
    failure no memfd is returned (all are closed).
    """
    segs: list[Segment] = [s if isinstance(s, Segment) else Segment(*s) for s in segments]
    raw = []
    for s in segs:
        path = os.fspath(s.path)
        length = s.length
        if length is None:
            try:
                length = os.stat(path).st_size - s.offset
            except OSError as e:
                raise oserror(e.errno or _errno.EIO, "stat", path) from None
        if s.offset < 0 or length < 0:
            raise SnapshotCorrupt(f"segment {path} [{s.offset}, +{length}) has a negative offset or length",
                                  stage="memfd restore", path=path)
        raw.append((path, s.offset, length, s.name or os.path.basename(path), _unhex(s.digest)))
    if thp is None:
        thp = not hugetlb and shmem_thp()["allowed"]
    thp = bool(thp) and not hugetlb
    if populate is None:
        # MADV_POPULATE_WRITE batches the 4 KiB page faults; with 2 MiB pages it only zeroes each page long
        # before the copy reaches it (measured ~10% slower on the CPU VM: benches/RESULTS.md, memfd run 2)
        populate = not (hugetlb or thp)
    flags = _flags(hugetlb=hugetlb, thp=thp, populate=populate, seal=seal, direct=direct)
    try:
        _n, res = _memfd.restore(raw, threads or default_threads(), flags, chunk_size, block_size)
    except _memfd.MemfdCError as e:
        raise _translate(e, "memfd restore") from None
    return [MemFd(fd, size, name=r[3], digest=_hex(h), sealed=sealed, hugetlb=huge, map_size=ms, thp=thp)
            for r, (fd, size, ms, h, huge, sealed) in zip(raw, res)]


def dump(memfds: Sequence[MemFd], paths: Sequence[str | os.PathLike], threads: Optional[int] = None, *,
         fsync: bool = True, direct: bool = False) -> list[DumpResult]:
    """Write each MemFd's content to a new file (must not exist) in parallel; returns sizes and digests.

    On failure every file this call created is removed.
    """
    ps = [os.fspath(p) for p in paths]
    try:
        _n, res = _memfd.dump([m.fd for m in memfds], [m.size for m in memfds], ps,
                              threads or default_threads(), _flags(fsync=fsync, direct=direct))
    except _memfd.MemfdCError as e:
        raise _translate(e, "memfd dump") from None
    return [DumpResult(p, size, _hex(h)) for p, (size, h) in zip(ps, res)]


def create(size: int, name: str = "dynsnap", *, hugetlb: bool = False) -> MemFd:
    """An empty, writable memfd of ``size`` bytes (zero-filled)."""
    try:
        fd, ms = _memfd.create(name, size, hugetlb)
    except _memfd.MemfdCError as e:
        raise _translate(e, "memfd create") from None
    return MemFd(fd, size, name=name, hugetlb=hugetlb, map_size=ms)


def digest(buffer: Any, threads: Optional[int] = None) -> str:
    """Region digest (16 hex chars) of a buffer: XXH3-64, seeded with the length, over the XXH3-64 of
    each 8 MiB chunk (little-endian). ``threads=1`` uses the single-threaded reference."""
    if threads == 1:
        return _hex(_memfd.digest(buffer))
    return _hex(_memfd.hash_buffer(buffer, threads or default_threads()))


def copy(dst: Any, src: Any, threads: Optional[int] = None) -> None:
    """``dst[:len(src)] = src`` with a pool of threads (GIL released)."""
    _memfd.copy(dst, src, threads or default_threads())


# ---- fixed-address mappings ----

def reserve(size: int) -> int:
    """Reserve ``size`` bytes of address space (PROT_NONE, MAP_NORESERVE); returns the address."""
    return _memfd.reserve(size)


def attach(fd: int, address: int, size: int, *, writable: bool = False) -> None:
    """Map ``fd`` MAP_SHARED|MAP_FIXED at ``address`` (inside a reservation of at least ``size`` bytes)."""
    _memfd.attach(fd, address, size, writable)


def detach(address: int, size: int) -> None:
    """Replace the mapping at ``address`` with an empty PROT_NONE reservation (one mmap, no window)."""
    _memfd.detach(address, size)


def release(address: int, size: int) -> None:
    """munmap the range entirely."""
    _memfd.release(address, size)


def view_at(address: int, size: int) -> memoryview:
    """A memoryview over raw mapped memory at ``address`` (valid while it stays mapped)."""
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


# ---- messages with fds over Unix sockets ----


