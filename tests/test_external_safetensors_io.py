"""safetensors files through the `safetensors` library (`diffcodec.external.safetensors_io`):
what the library writes is read back exactly; every malformed file is a one-line
DiffcodecError (the library's checks, and the repeated name it lets through); a header that
does not fit the config is refused before any tensor is read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from diffcodec.errors import DiffcodecError
from diffcodec.external import safetensors_io
from diffcodec.external.safetensors_io import read_header, read_safetensors


def raw(header: str | dict, body: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    return struct.pack("<Q", len(text.encode())) + text.encode() + body


def entry(dtype: str, shape, offsets) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_reads_what_the_safetensors_package_writes(tmp_path, dtype):
    tensors = {"a.weight": (torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) / 7 - 1).to(dtype),
               "b": torch.tensor([3.5]).to(dtype), "empty": torch.zeros(0, 5, dtype=dtype)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    got = read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for name, value in tensors.items():
        assert got[name].dtype == dtype and torch.equal(got[name], value)
    name = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64"}[dtype]
    assert read_header(tmp_path / "x.safetensors") == {"a.weight": (name, (2, 3, 4)), "b": (name, (1,)),
                                                       "empty": (name, (0, 5))}


F32x2 = entry("F32", [2], [0, 8])
MALFORMED = {  # name: (file bytes, what the message says)
    "empty": (b"", "shorter than its 8-byte header length"),
    "header length past the file": (struct.pack("<Q", 100) + b"{}", "not a valid safetensors file"),
    "header length 2^63": (struct.pack("<Q", 1 << 63) + b"{}", "a header of 9,223,372,036,854,775,808 bytes"),
    "not JSON": (raw("{x"), "not a valid safetensors file (invalid JSON in header"),
    "deep JSON": (raw("[" * 200_000 + "]" * 200_000), "not a valid safetensors file"),
    "a list": (raw("[1, 2]"), "not a valid safetensors file"),
    "overlapping offsets": (raw({"a": F32x2, "b": entry("F32", [1], [4, 8])}, bytes(8)), "invalid offset"),
    "the same offsets twice": (raw({"a": F32x2, "b": F32x2}, bytes(8)), "invalid offset"),
    "a gap": (raw({"a": entry("F32", [1], [4, 8])}, bytes(8)), "invalid offset"),
    "bytes after the last tensor": (raw({"a": entry("F32", [1], [0, 4])}, bytes(8)), "not fully covered"),
    "float offsets": (raw('{"a": {"dtype": "F32", "shape": [32], "data_offsets": [0.9, 128.9]}}', bytes(128)),
                      "invalid JSON in header"),
    "float shape": (raw('{"a": {"dtype": "F32", "shape": [32.7], "data_offsets": [0, 128]}}', bytes(128)),
                    "invalid JSON in header"),
    "negative shape": (raw('{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', bytes(4)),
                       "invalid JSON in header"),
    "shape [2^62, 4], offsets [0, 0]": (raw({"a": entry("F32", [2**62, 4], [0, 0])}), "overflow"),
    "shape [2^64, 1]": (raw({"a": entry("F32", [2**64, 1], [0, 0])}), "invalid JSON in header"),
    "a 5000-digit dimension": (raw('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}',
                                   bytes(4)), "invalid JSON in header"),
    "an unknown dtype": (raw({"a": entry("F33", [1], [0, 4])}, bytes(4)), "invalid JSON in header"),
    "a name repeated, another entry": (raw('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                           '"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', bytes(16)),
                                       "invalid offset"),
    "a name repeated, the same entry": (raw('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                            '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
                                        'the key "a" appears twice'),
    "a metadata key repeated": (raw('{"__metadata__": {"format": "pt", "format": "np"}, '
                                    '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
                                'the key "format" appears twice'),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_file_is_a_one_line_error(tmp_path, case):
    data, message = MALFORMED[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    for read in (read_header, read_safetensors):
        with pytest.raises(DiffcodecError) as info:
            read(path)
        text = str(info.value)
        assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_a_file_that_is_not_there_or_a_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DiffcodecError, match="cannot read"):
        read_header(tmp_path / "missing.safetensors")
    with pytest.raises(DiffcodecError, match="cannot read"):
        read_header(tmp_path)


def test_neutral_header_variations_read_the_same_tensors(tmp_path):
    """Entries in another order, an extra field, spaces after the JSON (which the format
    allows as padding): the same tensors."""
    body = struct.pack("<3f", 1.0, 2.0, 3.0)
    a, b = entry("F32", [2], [0, 8]), entry("F32", [1], [8, 12])
    files = [raw({"a": a, "b": b}, body), raw({"b": b, "a": a}, body), raw({"a": dict(a, x=[1, {}]), "b": b}, body),
             raw(json.dumps({"a": a, "b": b}) + "    ", body)]
    got = []
    for i, data in enumerate(files):
        (tmp_path / f"{i}.safetensors").write_bytes(data)
        got.append(read_safetensors(tmp_path / f"{i}.safetensors"))
    for tensors in got:
        assert tensors.keys() == {"a", "b"} and torch.equal(tensors["a"], torch.tensor([1.0, 2.0]))
        assert torch.equal(tensors["b"], torch.tensor([3.0]))


def test_weights_that_do_not_fit_are_refused_from_the_header_before_any_tensor_is_read(tmp_path, monkeypatch):
    from diffcodec.external.diffusers import read_weights

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int32)}, path)

    def no_tensors(_):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors_io, "read_safetensors", no_tensors)
    monkeypatch.setattr("diffcodec.external.diffusers.read_safetensors", no_tensors)
    with pytest.raises(DiffcodecError, match=r"weights do not fit the config \(a is \[2, 3\], the config needs \[3, 2"):
        read_weights(path, {"a": (3, 2), "b": (4,)})
    with pytest.raises(DiffcodecError, match=r"weights do not fit the config \(missing c\)"):
        read_weights(path, {"a": (2, 3), "b": (4,), "c": (1,)})
    with pytest.raises(DiffcodecError, match=r"weights do not fit the config \(b is not floating point\)"):
        read_weights(path, {"a": (2, 3), "b": (4,)})
