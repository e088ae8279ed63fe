"""Extract the uncompressed ELF kernel (vmlinux) from a bzImage (vmlinuz).

Firecracker boots only an ELF kernel on x86_64; Debian ships bzImages. Like
the kernel's own scripts/extract-vmlinux, look for a compressed payload and
keep the first one that decompresses to an ELF file.

    python3 extract-vmlinux.py VMLINUZ VMLINUX
"""

from __future__ import annotations

import bz2
import lzma
import os
import sys
import zlib
from collections.abc import Callable

ELF = b"\x7fELF"


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor().decompress(data)


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(31).decompress(data)


def _bzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


def _zstd(data: bytes) -> bytes:
    import subprocess

    result = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=False)
    return result.stdout


CODECS: list[tuple[bytes, Callable[[bytes], bytes]]] = [
    (b"\xfd7zXZ\x00", _xz),
    (b"\x28\xb5\x2f\xfd", _zstd),
    (b"\x1f\x8b\x08", _gzip),
    (b"BZh", _bzip2),
]


def extract(data: bytes) -> bytes:
    for magic, decompress in CODECS:
        start = data.find(magic)
        while start != -1:
            try:
                out = decompress(data[start:])
            except Exception:  # not a payload after all: keep looking
                out = b""
            if out[:4] == ELF:
                return out
            start = data.find(magic, start + 1)
    raise SystemExit("no ELF kernel found inside the image")


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    with open(source, "rb") as f:
        kernel = extract(f.read())
    with open(target + ".tmp", "wb") as f:
        f.write(kernel)
    os.replace(target + ".tmp", target)


if __name__ == "__main__":
    main()
