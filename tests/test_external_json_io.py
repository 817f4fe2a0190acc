"""JSON from others' files (`diffcodec.external.json_io`): standard JSON objects are read; any
other content is one line naming the file and the problem, never a traceback."""

from __future__ import annotations

import pytest

from diffcodec.errors import DiffcodecError
from diffcodec.external.json_io import MAX_JSON_BYTES, parse_json, read_json_object, show_json

BAD = {  # file bytes: what the message says
    b"{": "not valid JSON (Expecting property name",
    b'{"a": 1, "a": 1}': 'not valid JSON (the key "a" appears twice)',
    b'{"a": {"b": 1, "b": 2}}': 'not valid JSON (the key "b" appears twice)',
    b'{"a": NaN}': "not valid JSON (NaN is not JSON)",
    b'{"a": -Infinity}': "not valid JSON (-Infinity is not JSON)",
    b'{"a": ' + b"1" * 5000 + b"}": "not valid JSON (Exceeds the limit (4300 digits)",
    b"[" * 100_000 + b"]" * 100_000: "not valid JSON (nested too deeply to read)",
    b'{"a": "\xff"}': "not valid JSON (not UTF-8 text)",
    b" " * (MAX_JSON_BYTES + 1): "more than 4,194,304 bytes of JSON",
    b"[1, 2]": "not a JSON object",
}


@pytest.mark.parametrize("data", list(BAD), ids=[repr(d[:20]) for d in BAD])
def test_anything_but_a_json_object_is_a_one_line_error(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    with pytest.raises(DiffcodecError) as info:
        read_json_object(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and BAD[data] in text and "\n" not in text, text


def test_standard_json_is_read():
    assert parse_json(b' {"a": [1, 2.5, null, true, "\\u00e9"], "b": {"c": 1e400}} \n', "x") == {
        "a": [1, 2.5, None, True, "\u00e9"], "b": {"c": float("inf")}}


def test_a_missing_file_or_a_folder_is_a_one_line_error(tmp_path):
    for path in (tmp_path / "missing.json", tmp_path):
        with pytest.raises(DiffcodecError, match=f"^{tmp_path}.*: cannot read"):
            read_json_object(path)


def test_values_are_shown_in_one_short_line():
    assert show_json({"linear": 1}) == '{"linear": 1}'
    assert show_json("a\nb") == '"a\\nb"'
    assert show_json("x" * 1000) == '"' + "x" * 56 + "..."
    assert show_json(10**5000) == "<a int too large to print>"
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    assert show_json(deep) == "<a list too large to print>"
