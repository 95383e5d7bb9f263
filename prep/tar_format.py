"""The bytes of a shard's tar: deterministic ustar headers, payloads, padding, the end of the archive.

A header depends only on the member's name and size (mode 644, time 0, no owner), so the same samples
give the same bytes on every machine; they are tarfile's own bytes for the same TarInfo
(tests/test_build.py). A shard is its samples' members end to end, then `archive_end`.
"""

from __future__ import annotations

import tarfile
from typing import Sequence

BLOCK = 512  # bytes per tar block: headers and padded payloads
RECORD = 20 * BLOCK  # an archive is padded to a multiple of this, as tarfile and GNU tar do


def tar_header(name: str, size: int) -> bytes:
    """The header of a regular file `name` of `size` bytes, mode 644, no time or owner: tarfile's bytes."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii():  # needs a pax record: let tarfile write it
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
        info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(BLOCK)
    h[0:len(encoded)] = encoded
    h[100:124] = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"00000000000\x00"  # mtime 0
    h[148:157] = b"        0"  # checksum placeholder (8 spaces), type regular file
    h[257:265] = b"ustar\x0000"  # uname, gname, devmajor, devminor, prefix: all NUL
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def sample_members(key: str, fields: Sequence[tuple[str, bytes]]) -> bytes:
    """One sample's members `key.ext` in the order given: header, payload, padding to a whole block."""
    out = []
    for ext, payload in fields:
        out += [tar_header(f"{key}.{ext}", len(payload)), payload, bytes(-len(payload) % BLOCK)]
    return b"".join(out)


def archive_end(size: int) -> bytes:
    """What follows `size` bytes of members: two zero blocks, then zeros to a whole RECORD."""
    return bytes(2 * BLOCK + (-(size + 2 * BLOCK) % RECORD))
