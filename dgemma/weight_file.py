"""One safetensors file, read a tensor at a time straight onto its device and dtype (or quantised to FP8).

`checkpoint.load` builds the model on the meta device and fills it from here, one tensor at a time:

- a tensor that stays on the CPU in the file's dtype is the memory-mapped view safetensors gives (no copy: its pages
  are the page cache's, read when first touched);
- anything else (another device, another dtype, quantised to FP8) is read with plain file reads a slab of rows at a
  time (a few MB) into one reused host buffer, each slab moved to the device, converted or quantised there, and
  written into the destination tensor. The float bytes never become part of this process's resident memory: no host
  copy of the model, or of one large tensor, ever exists, whatever the target device.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import fp8

SLAB_BYTES = 1 << 22  # 4 MB of the file per read; a bf16 slab's fp32 work space is 8 MB
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in the file."""

    dtype: torch.dtype | None  # None: a dtype torch cannot hold (`kind` names it)
    kind: str  # the file's dtype name: BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    start: int  # byte offset of its data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return self.numel // self.cols if self.cols else 0

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class WeightFile:
    """An open safetensors file (validated by safetensors on open; its header parsed here for the byte offsets).
    Use as a context manager; `read` and `read_quantized` take one tensor."""

    def __init__(self, path: str | Path, slab_bytes: int = SLAB_BYTES):
        self.path = Path(path)
        self.slab_bytes = slab_bytes
        self._mmap = safe_open(str(self.path), framework="pt", device="cpu")  # raises on a corrupt file
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        self.entries: dict[str, Entry] = {}
        for name, e in header.items():
            begin, end = e["data_offsets"]
            self.entries[name] = Entry(DTYPES.get(e["dtype"]), e["dtype"], tuple(e["shape"]), 8 + n + begin,
                                       end - begin)
        self._fh = None

    def __enter__(self) -> WeightFile:
        self._mmap.__enter__()
        self._fh = open(self.path, "rb", buffering=0)
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()
        self._mmap.__exit__(*exc)

    def names(self) -> list[str]:
        return list(self._mmap.keys())

    def dtype(self, name: str) -> torch.dtype | str:
        """The tensor's torch dtype, or the file's name for one torch cannot hold."""
        e = self.entries[name]
        return e.dtype or e.kind

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor on `device` in `dtype` (None: the file's). On the CPU in the file's dtype: the memory-mapped
        view; otherwise read slab by slab into a tensor allocated on the device."""
        e, device = self.entries[name], torch.device(device)
        if e.dtype is None:
            raise ValueError(f"dtype {e.kind} is not one torch can hold")
        dtype = dtype or e.dtype
        if device.type == "cpu" and dtype == e.dtype:
            return self._mmap.get_tensor(name)
        out = torch.empty(e.rows, e.cols, dtype=dtype, device=device)
        for row, slab in self._slabs(e):
            out[row:row + slab.shape[0]].copy_(slab.to(device))  # converts on the device
        return out.view(e.shape)

    def read_quantized(self, name: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """`fp8.quantize` of a float tensor, on `device`: (fp8 [..., out, in], fp32 scale [..., out, 1]), each slab
        of rows quantised on the device as it arrives."""
        e, device = self.entries[name], torch.device(device)
        if e.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype {e.dtype or e.kind} cannot be quantised (expected bfloat16, float16 or "
                             "float32)")
        q = torch.empty(e.rows, e.cols, dtype=fp8.FP8, device=device)
        scale = torch.empty(e.rows, 1, dtype=torch.float32, device=device)
        for row, slab in self._slabs(e):
            k = slab.shape[0]
            q[row:row + k], scale[row:row + k] = fp8.quantize(slab.to(device))
        return q.view(e.shape), scale.view(*e.shape[:-1], 1)

    def _slabs(self, e: Entry):
        """(first row, host tensor [k, cols]) over the tensor, a few MB per read into one reused buffer."""
        size = e.nbytes // max(1, e.numel)
        row_bytes = e.cols * size
        step = max(1, self.slab_bytes // max(1, row_bytes))
        buf = bytearray(min(step, max(e.rows, 1)) * row_bytes)
        for row in range(0, e.rows, step):
            k = min(step, e.rows - row)
            view = memoryview(buf)[:k * row_bytes]
            self._fh.seek(e.start + row * row_bytes)
            got = 0
            while got < len(view):
                r = self._fh.readinto(view[got:])
                if not r:
                    raise ValueError("the file ends inside the tensor (truncated?)")
                got += r
            yield row, torch.frombuffer(view, dtype=e.dtype).view(k, e.cols)
