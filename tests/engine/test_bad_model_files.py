"""Damaged and incomplete model files: `textcomplete serve` prints one line naming the file and the problem,
and exits non-zero, without a traceback (and never crashes in native code)."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader

from tests.tiny_gguf import write_llama_gguf


@pytest.fixture(scope="module")
def good_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(tiny_model_dir("llama"), path, QType.Q8_0)
    return path


def serve(model: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "textcomplete.cli", "serve", "--model", str(model), "--port",
                           str(port)], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def assert_refused(model: Path, *phrases: str, named: Path | None = None) -> str:
    """`serve --model model` fails with one error line naming `named` (default: the model) and `phrases`."""
    run = serve(model)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert "Traceback" not in output and "Exception" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("textcomplete: error: ")]
    assert len(errors) == 1, output
    line = errors[0]
    assert f"{named or model}" in line, line
    for phrase in phrases:
        assert phrase in line, line
    return line


def _copy(source: Path, tmp_path: Path, name: str = "model.gguf") -> Path:
    target = tmp_path / name
    shutil.copy(source, target)
    return target


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_a_truncated_gguf_names_the_tensor_past_the_end(good_gguf, tmp_path):
    bad = _copy(good_gguf, tmp_path)
    _cut(bad, bad.stat().st_size // 2)
    assert_refused(bad, "past the end of the file", "truncated")


def test_a_gguf_cut_inside_its_header(good_gguf, tmp_path):
    bad = _copy(good_gguf, tmp_path)
    _cut(bad, 3000)   # inside the tokenizer's metadata
    assert_refused(bad, "truncated or damaged", "metadata")


def test_an_empty_file_and_a_wrong_magic(good_gguf, tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_refused(empty, "GGUF")
    bad = _copy(good_gguf, tmp_path)
    data = bytearray(bad.read_bytes())
    data[:4] = b"GGML"
    bad.write_bytes(bytes(data))
    assert_refused(bad, "not a GGUF file", "GGML")


def _edit_tensor_table(path: Path, index: int, part: int, value) -> None:
    """Overwrite one field of a tensor's entry in the table (parts: name length, name, rank, shape, type,
    offset), in place."""
    reader = GGUFReader(str(path), "r+")
    reader.tensors[index].field.parts[part][:] = value
    reader.data.flush()
    del reader


def test_a_tensor_offset_past_the_end(good_gguf, tmp_path):
    bad = _copy(good_gguf, tmp_path)
    _edit_tensor_table(bad, 1, 5, 1 << 40)
    assert_refused(bad, "past the end of the file")


def test_absurd_tensor_dimensions(good_gguf, tmp_path):
    bad = _copy(good_gguf, tmp_path)
    _edit_tensor_table(bad, 1, 3, [1 << 40, 1 << 30])
    assert_refused(bad, "1099511627776 x 1073741824", "past the end of the file")
    zero = _copy(good_gguf, tmp_path, "zero.gguf")
    _edit_tensor_table(zero, 1, 3, [0, 384])
    assert_refused(zero, "impossible shape")


def test_absurd_model_dimensions_in_the_metadata(good_gguf, tmp_path):
    bad = _copy(good_gguf, tmp_path)
    reader = GGUFReader(str(bad), "r+")
    reader.fields["llama.block_count"].parts[-1][:] = 0
    reader.data.flush()
    del reader
    assert_refused(bad, "llama.block_count = 0", "not a plausible size")


def test_a_gguf_without_a_tokenizer(tiny_model_dir, tmp_path):
    bad = tmp_path / "no-tokenizer.gguf"
    write_llama_gguf(tiny_model_dir("llama"), bad, QType.F32, with_tokenizer=False)
    assert_refused(bad, "no tokenizer")


@pytest.fixture
def hf_copy(tiny_model_dir, tmp_path) -> Path:
    target = tmp_path / "hf"
    shutil.copytree(tiny_model_dir("llama"), target)
    return target


def test_a_directory_without_a_tokenizer(hf_copy):
    (hf_copy / "tokenizer.json").unlink()
    assert_refused(hf_copy, "no tokenizer.json")


def _rewrite_safetensors_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    encoded = json.dumps(edit(header)).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def test_a_safetensors_header_that_lies_about_offsets(hf_copy):
    weights = hf_copy / "model.safetensors"

    def lie(header: dict) -> dict:
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 1 << 30   # a gigabyte past the end of the file
        return header
    _rewrite_safetensors_header(weights, lie)
    assert_refused(hf_copy, "not a valid safetensors file", named=weights)


def test_a_safetensors_header_length_that_lies(hf_copy):
    weights = hf_copy / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    assert_refused(hf_copy, "not a valid safetensors file", named=weights)
