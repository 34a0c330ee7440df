"""Reading .safetensors files (8-byte header length, JSON header, data) for ``Store.import_safetensors``."""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator

from ..errors import ShardCorrupt, WeightsError
from .format import DTYPE_SIZES, _RawTensor

__all__ = ["SafetensorsFile"]


class SafetensorsFile:
    """A safetensors file parsed by hand (8-byte header length, JSON header, data) over an mmap."""

    def __init__(self, path: str):
        import mmap
        self.path = path
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise WeightsError(f"no such safetensors file: {path}", path=path) from None
        try:
            size = os.fstat(self._f.fileno()).st_size
            head = self._f.read(8)
            if len(head) < 8:
                raise ShardCorrupt(f"{path} is not a safetensors file (shorter than 8 bytes)", path=path)
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8 or hlen > 100 << 20:
                raise ShardCorrupt(f"{path} is not a safetensors file (header length {hlen})", path=path)
            try:
                header = json.loads(self._f.read(hlen))
            except ValueError as e:
                raise ShardCorrupt(f"{path} has a malformed safetensors header: {e}", path=path) from None
            self.base = 8 + hlen
            self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            self._mv = memoryview(self._map) if self._map is not None else memoryview(b"")
            self.header = header
            self.size = size
        except BaseException:
            self._f.close()
            raise

    def items(self) -> Iterator[tuple[str, _RawTensor]]:
        entries = [(k, v) for k, v in self.header.items() if k != "__metadata__"]
        entries.sort(key=lambda kv: kv[1].get("data_offsets", [0])[0])
        for k, v in entries:
            try:
                dt, shape, (a, b) = v["dtype"], [int(x) for x in v["shape"]], v["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ShardCorrupt(f"{self.path}: bad header entry for tensor {k!r}", path=self.path, tensor=k) from None
            if dt not in DTYPE_SIZES:
                raise WeightsError(f"{self.path}: tensor {k!r} has unsupported dtype {dt}", tensor=k, path=self.path)
            n = DTYPE_SIZES[dt]
            for d in shape:
                n *= d
            if b - a != n or a < 0 or self.base + b > self.size:
                raise ShardCorrupt(f"{self.path}: tensor {k!r} data [{a}, {b}) does not match its shape or the file",
                                   path=self.path, tensor=k)
            yield k, _RawTensor(dt, shape, self._mv[self.base + a:self.base + b])

    def close(self) -> None:
        try:
            self._mv.release()
        except Exception:  # noqa: BLE001 - slices may still be referenced until save returns
            pass
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
        self._f.close()
