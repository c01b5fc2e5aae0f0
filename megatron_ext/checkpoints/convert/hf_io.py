"""Hugging Face safetensors checkpoints: streaming reads (safe_open, mmap) and streaming writes.

Reading maps one file at a time and hands out zero-copy tensors; the file is unmapped when the
reader moves to another file or has handed out ``remap_bytes`` since mapping it, so resident
memory stays near one tensor group rather than growing to the whole file. Writing plans every
shard up front from (name, shape, dtype), writes each file's header first and then each tensor as
it arrives, so no shard is ever assembled in memory.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from megatron_ext.checkpoints.convert.hf_config import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


class HFCheckpointReader:
    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
            if not files:
                has_bin = any(n.endswith(".bin") for n in os.listdir(folder))
                raise ConversionError(
                    f"{folder} has no *.safetensors weights"
                    + (" (only PyTorch .bin files; re-save with save_pretrained(safe_serialization="
                       "True))" if has_bin else ""))
            weight_map = None
        self._file_of: Dict[str, str] = {}
        self._shapes: Dict[str, Tuple[Tuple[int, ...], str]] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise ConversionError(f"{INDEX_FILE} names {name}, which does not exist")
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    self._file_of[key] = path
                    self._shapes[key] = (tuple(sl.get_shape()), sl.get_dtype())
        if weight_map is not None:
            absent = [k for k, v in weight_map.items()
                      if self._file_of.get(k) != os.path.join(folder, v)]
            if absent:
                raise ConversionError(f"{INDEX_FILE} lists tensors missing from their files: "
                                      f"{', '.join(absent[:8])}")
        self._open_path: Optional[str] = None
        self._handle = None
        self._mapped_bytes = 0
        # Touched pages of a mapped file count as resident until it is unmapped: remap after
        # handing out this many bytes, so residency stays near one tensor group, not one file.
        self.remap_bytes = 64 * 2**20

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: shape for k, (shape, _) in self._shapes.items()}

    def dtype_name(self, name: str) -> str:
        return self._shapes[name][1]

    def file_sizes(self) -> List[int]:
        return [os.path.getsize(p) for p in sorted(set(self._file_of.values()))]

    def get(self, name: str) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise ConversionError(f"HF checkpoint has no tensor {name}")
        if path != self._open_path or self._mapped_bytes > self.remap_bytes:
            self.release()
            self._handle = safe_open(path, framework="pt")
            self._open_path = path
        tensor = self._handle.get_tensor(name)
        self._mapped_bytes += tensor.nbytes
        return tensor

    def release(self) -> None:
        """Unmap the open file (its pages stop counting as this process's memory)."""
        self._handle, self._open_path, self._mapped_bytes = None, None, 0


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 (HF's convention), '500MiB' -> 500 * 2**20, '123' -> 123 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot parse size {text!r}; use e.g. 5GB or 500MiB")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


class SafetensorsShardWriter:
    """Writes tensors, in a pre-declared order, into HF-style shards plus the index when >1 file."""

    def __init__(self, folder: str, entries: Sequence[Tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int):
        self.folder = folder
        shards: List[List[Tuple[str, Tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                                   for k in range(n)]
        self._order = [(name, shape, dtype, k) for k, shard in enumerate(shards)
                       for name, shape, dtype, _ in shard]
        self._shards = shards
        self._next = 0
        self._file = None
        self._file_index = -1
        self.total_size = sum(nb for shard in shards for *_, nb in shard)
        os.makedirs(folder, exist_ok=True)

    def _finish_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _open_shard(self, k: int) -> None:
        self._finish_file()
        header, offset = {}, 0
        for name, shape, dtype, nbytes in self._shards[k]:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        # Written as *.partial and renamed by close(): a failed export leaves no valid-looking file.
        self._file = open(os.path.join(self.folder, self.files[k] + ".partial"), "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._file_index = k

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ConversionError(f"writer got unexpected tensor {name}")
        want, shape, dtype, k = self._order[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"writer expected {want} {shape} {dtype}, got {name} "
                                  f"{tuple(tensor.shape)} {tensor.dtype}")
        if k != self._file_index:
            self._open_shard(k)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> List[str]:
        if self._next != len(self._order):
            raise ConversionError(f"writer closed after {self._next} of {len(self._order)} "
                                  f"tensors; next expected: {self._order[self._next][0]}")
        self._finish_file()
        for name in self.files:
            path = os.path.join(self.folder, name)
            os.replace(path + ".partial", path)
        if len(self.files) > 1:
            weight_map = {name: self.files[k] for name, _, _, k in self._order}
            with open(os.path.join(self.folder, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map},
                          f, indent=2)
        return list(self.files)


def copy_tokenizer_files(src: str, dst: str) -> List[str]:
    """Tokenizer, chat template and generation config of a reference HF folder."""
    import shutil

    patterns = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.json|"
                          r"merges\.txt|chat_template\.(jinja|json)|generation_config\.json|"
                          r".*\.tiktoken)$")
    copied = []
    for name in sorted(os.listdir(src)):
        if patterns.match(name) and os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied
