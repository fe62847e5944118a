"""benchmarks/wheel_parts.py: a wheel split for the GPU transfers comes back byte for byte, and
a missing or damaged part is named instead of installed."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks.wheel_parts import PartsError, join, main, split


@pytest.fixture
def wheel(tmp_path):
    w = tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    w.write_bytes(os.urandom(int(2.5 * 2 ** 20)))
    return w


def test_split_and_join_round_trip(tmp_path, wheel):
    carry = split(wheel, tmp_path / "parts", part_mib=1)
    record = json.loads(carry[0].read_text())
    assert [p.name for p in carry[1:]] == record["parts"] and len(record["parts"]) == 3
    assert max(p.stat().st_size for p in carry[1:]) <= 2 ** 20
    rebuilt = join(tmp_path / "parts", tmp_path / "out")
    assert rebuilt.name == wheel.name and rebuilt.read_bytes() == wheel.read_bytes()


def test_a_missing_part_is_named(tmp_path, wheel):
    carry = split(wheel, tmp_path / "parts", part_mib=1)
    carry[2].unlink()
    with pytest.raises(PartsError, match=carry[2].name):
        join(tmp_path / "parts", tmp_path / "out")


def test_a_damaged_part_is_refused_and_nothing_is_left(tmp_path, wheel, capsys):
    carry = split(wheel, tmp_path / "parts", part_mib=1)
    data = bytearray(carry[1].read_bytes())
    data[100] ^= 0xFF
    carry[1].write_bytes(bytes(data))
    code = main(["join", "--dir", str(tmp_path / "parts"), "--out", str(tmp_path / "out")])
    assert code == 2 and "send them again" in capsys.readouterr().err
    assert not (tmp_path / "out" / wheel.name).exists()


def test_resplitting_replaces_older_parts(tmp_path, wheel):
    split(wheel, tmp_path / "parts", part_mib=1)
    carry = split(wheel, tmp_path / "parts", part_mib=2)
    assert sorted(p.name for p in (tmp_path / "parts").glob("*.part[0-9]*")) == \
        sorted(p.name for p in carry[1:])
