"""Seeded mutation fuzzing of the caffemodel and prototxt loaders.

A good caffemodel and prototxt (the tiny model of tests/helpers.py) are mutated -- bits flipped, the file
truncated, bytes inserted, a field (a byte range of the binary file, a line of the text file) duplicated --
and each mutant is read and built into a net. The only acceptable outcomes are success or an AmctError:
never another exception type, never a hang (each case runs under an alarm), never a huge allocation (the
element limits are set small for the run).

The normal run tries ``AMCT_FUZZ_CASES`` mutants per loader (default 150, a few seconds); a developer run
sets it higher, e.g. ``AMCT_FUZZ_CASES=20000``, and ``AMCT_FUZZ_SEED`` to explore other mutants (see
docs/design.md, "Limits").
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from amct_caffe.engine.net import Net
from amct_caffe.errors import AmctError
from amct_caffe.model.io import load_caffemodel, load_prototxt
from amct_caffe.proto import caffe_pb2
from tests.helpers import TINY_NET, tiny_caffemodel

CASES = int(os.environ.get("AMCT_FUZZ_CASES", "150"))
SEED = int(os.environ.get("AMCT_FUZZ_SEED", "20240601"))
#: Seconds one mutant may take before it counts as a hang.
ALARM_S = 20


def _flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(len(out)))
        out[i] ^= 1 << int(rng.integers(8))
    return bytes(out)


def _truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(len(data)))]


def _insert_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    i = int(rng.integers(len(data) + 1))
    junk = bytes(rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8))
    return data[:i] + junk + data[i:]


def _duplicate_range(data: bytes, rng: np.random.Generator) -> bytes:
    """Repeat a byte range: in a binary protobuf this often repeats a whole field (or a field's tail)."""
    i = int(rng.integers(len(data)))
    j = min(len(data), i + int(rng.integers(1, 64)))
    return data[:j] + data[i:j] + data[j:]


def _duplicate_line(data: bytes, rng: np.random.Generator) -> bytes:
    lines = data.splitlines(keepends=True)
    i = int(rng.integers(len(lines)))
    return b"".join(lines[: i + 1] + [lines[i]] + lines[i + 1:])


def _replace_number(data: bytes, rng: np.random.Generator) -> bytes:
    """Put an extreme or odd value where the text has a number (the text analogue of a bit flip)."""
    text = data.decode("utf-8", errors="replace")
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    if not digits:
        return data
    i = digits[int(rng.integers(len(digits)))]
    values = ["0", "-1", "2147483647", "4294967295", "99999999999", "1e38", "nan", "-0"]
    return (text[:i] + values[int(rng.integers(len(values)))] + text[i + 1:]).encode("utf-8")


BINARY_MUTATIONS = [_flip_bits, _truncate, _insert_bytes, _duplicate_range]
TEXT_MUTATIONS = [_flip_bits, _truncate, _insert_bytes, _duplicate_line, _replace_number]


def _mutants(data: bytes, mutations: list[Callable[[bytes, np.random.Generator], bytes]],
             seed: int) -> Iterator[tuple[int, str, bytes]]:
    rng = np.random.default_rng(seed)
    for case in range(CASES):
        mutate = mutations[case % len(mutations)]
        yield case, mutate.__name__, mutate(data, rng)


@contextmanager
def _alarm(label: str) -> Iterator[None]:
    def hang(signum: int, frame: object) -> None:
        raise TimeoutError(f"{label} took over {ALARM_S} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(ALARM_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small limits: a mutant that asks for a big blob is refused before it allocates."""
    monkeypatch.setenv("AMCT_CAFFE_MAX_ELEMENTS", str(10**6))
    monkeypatch.setenv("AMCT_CAFFE_MAX_NET_ELEMENTS", str(10**7))
    monkeypatch.setenv("AMCT_DATA_SOURCE_LIMIT_MB", "1")


def _only_amct_errors(run: Callable[[], object], label: str, failures: list[str]) -> bool:
    """Run one mutant; True when it was accepted, False when it gave an AmctError (anything else is
    recorded in ``failures``)."""
    try:
        with _alarm(label):
            run()
    except AmctError:
        return False
    except Exception as exc:  # noqa: BLE001 -- the fuzz collects every other exception as a failure
        failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
        return False
    return True


def test_fuzz_caffemodel_loader(tmp_path: Path) -> None:
    model = tmp_path / "model.prototxt"
    model.write_text(TINY_NET)
    good = tiny_caffemodel()
    weights = tmp_path / "mutant.caffemodel"
    failures: list[str] = []
    for case, name, data in _mutants(good, BINARY_MUTATIONS, SEED):
        weights.write_bytes(data)
        label = f"caffemodel case {case} ({name}, seed {SEED})"
        if _only_amct_errors(lambda: load_caffemodel(weights), label, failures):
            _only_amct_errors(lambda: Net(str(model), caffe_pb2.TEST, weights=str(weights)), label, failures)
    assert not failures, "\n".join(failures[:20])


def test_fuzz_prototxt_loader(tmp_path: Path) -> None:
    weights = tmp_path / "weights.caffemodel"
    weights.write_bytes(tiny_caffemodel())
    model = tmp_path / "mutant.prototxt"
    failures: list[str] = []
    for case, name, data in _mutants(TINY_NET.encode("utf-8"), TEXT_MUTATIONS, SEED + 1):
        model.write_bytes(data)
        label = f"prototxt case {case} ({name}, seed {SEED + 1})"
        if _only_amct_errors(lambda: load_prototxt(model), label, failures):
            _only_amct_errors(lambda: Net(str(model), caffe_pb2.TEST, weights=str(weights)), label, failures)
    assert not failures, "\n".join(failures[:20])
