"""Compact byte fields shared by the container and the parameter blocks: LEB128 varints, a
defensive reader, and presence-masked field tables.

A field table lists a block's optional fields in mask-bit order. `pack_fields` writes a
varint mask with bit i set when field i differs from its default, then the set fields'
values as varints, in table order; booleans are the mask bit alone (set = not the
default). Appending a field to a table costs one line and keeps old files readable (its
bit is clear in them); a file that sets a bit this diffcodec does not know is refused.

Kinds of fields: "u" unsigned varint; "s" signed (zigzag); "q" a multiple of 1/4, stored
x 4; "w" unsigned below 2^64; "b" boolean (mask bit only); ("c", codes) an index into the tuple of names ``codes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffcodec.errors import DiffcodecError

VARINT_LIMIT = 1 << 32  # the default bound of a varint field


def varint(n: int, limit: int = VARINT_LIMIT) -> bytes:
    """LEB128: 7 bits per byte, low first, high bit set on all but the last byte."""
    if not 0 <= n < limit:
        raise ValueError(f"{n} does not fit a field below {limit}")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def zigzag(n: int) -> int:
    return 2 * n if n >= 0 else -2 * n - 1


def unzigzag(n: int) -> int:
    return n >> 1 if not n & 1 else -((n + 1) >> 1)


class Reader:
    """Reads a byte string front to back; every problem is a one-line DiffcodecError.

    ``block``: None for the container (a short read is a truncated file), else the name of
    a parameter block inside it (a short read is then a corrupt block: the container's CRC
    already vouched for its length)."""

    def __init__(self, data: bytes, where: str, block: str | None = None) -> None:
        self.data, self.pos, self.where, self.block = data, 0, where, block

    def fail(self, what: str) -> DiffcodecError:
        return DiffcodecError(f"{self.where}: corrupt {self.block or 'header'} ({what})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            if self.block:
                raise self.fail(f"ends inside the {what}")
            raise DiffcodecError(f"{self.where}: truncated file (ends inside the {what})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str, limit: int = VARINT_LIMIT) -> int:
        """A LEB128 integer below ``limit`` (`varint`); at most 10 bytes."""
        value = 0
        for shift in range(0, 70, 7):
            b = self.byte(what)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if value >= limit:
                    break
                return value
        raise self.fail(f"{what} field too long")

    def at_end(self) -> bool:
        return self.pos == len(self.data)


Field = tuple[str, Any]  # (name, kind)


def pack_fields(values: Callable[[str], Any], defaults: dict[str, Any], table: tuple[Field, ...]) -> bytes:
    """The mask and the non-default fields' values (module docstring)."""
    mask, body = 0, bytearray()
    for bit, (name, kind) in enumerate(table):
        value = values(name)
        if value == defaults[name]:
            continue
        mask |= 1 << bit
        if kind == "b":
            continue
        if kind == "s":
            body += varint(zigzag(int(value)))
        elif kind == "q":
            body += varint(int(value * 4))
        elif kind == "w":
            body += varint(int(value), 1 << 64)
        elif isinstance(kind, tuple):
            body += varint(kind[1].index(value))
        else:
            body += varint(int(value))
    return varint(mask, 1 << 63) + bytes(body)


def read_fields(r: Reader, defaults: dict[str, Any], table: tuple[Field, ...]) -> dict[str, Any]:
    """The fields `pack_fields` wrote, defaults filled in (values unchecked beyond their kind)."""
    mask = r.varint("field mask", 1 << 63)
    if mask >> len(table):
        raise r.fail(f"fields unknown to this diffcodec are set (mask {mask:#x}): written by a newer diffcodec?")
    out = {}
    for bit, (name, kind) in enumerate(table):
        default = defaults[name]
        if not mask >> bit & 1:
            out[name] = default
        elif kind == "b":
            out[name] = not default
        elif kind == "s":
            out[name] = unzigzag(r.varint(name))
        elif kind == "q":
            out[name] = r.varint(name) / 4
        elif kind == "w":
            out[name] = r.varint(name, 1 << 64)
        elif isinstance(kind, tuple):
            code = r.varint(name)
            if code >= len(kind[1]):
                raise r.fail(f"{name} code {code}")
            out[name] = kind[1][code]
        else:
            out[name] = r.varint(name)
    return out
