"""Concurrent writers of the same outputs: two processes save a set of five files (four under a prefix,
one in another folder, as a save with its record) to the same paths in many rounds, started together each
round. After every round the set must come whole from one of the two writers: each file carries the
writer and the round, and all five must agree. Without the output lock one round in a few mixes them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from amct_caffe.model.atomic import TEMP_PREFIX

ROUNDS = 60

#: The writer: for each "go <round>" line on stdin, one AtomicFiles set of the five files, each starting
#: with "<writer> <round>" and padded to a size that differs per file and round (so the writers' commits
#: overlap in varying ways); then "done <round>" on stdout.
WRITER = r"""
import random, sys
from amct_caffe.model.atomic import AtomicFiles

writer, folder = sys.argv[1], sys.argv[2]
paths = [f"{folder}/out/m_fake_quant_model.prototxt", f"{folder}/out/m_fake_quant_weights.caffemodel",
         f"{folder}/out/m_deploy_model.prototxt", f"{folder}/out/m_deploy_weights.caffemodel",
         f"{folder}/record.txt"]
rng = random.Random(writer)
print("ready", flush=True)
for line in sys.stdin:
    round_ = line.split()[1]
    with AtomicFiles() as files:
        for path in paths:
            files.write(path, f"{writer} {round_}\n".encode() + b"x" * rng.randrange(1, 400_000))
    print(f"done {round_}", flush=True)
"""

FILES = ["out/m_fake_quant_model.prototxt", "out/m_fake_quant_weights.caffemodel",
         "out/m_deploy_model.prototxt", "out/m_deploy_weights.caffemodel", "record.txt"]


def first_line(path: Path) -> str:
    with open(path, "rb") as handle:
        return handle.readline().decode().strip()


def test_two_writers_never_mix_a_set(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, name, str(tmp_path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env) for name in ("A", "B")]
    try:
        for proc in writers:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        winners = set()
        for round_ in range(ROUNDS):
            for proc in writers:
                assert proc.stdin is not None
                proc.stdin.write(f"go {round_}\n")
                proc.stdin.flush()
            for proc in writers:
                assert proc.stdout is not None and proc.stdout.readline().strip() == f"done {round_}"
            lines = {name: first_line(tmp_path / name) for name in FILES}
            assert len(set(lines.values())) == 1, f"round {round_}: a mixed set {lines}"
            writer, written = next(iter(lines.values())).split()
            assert written == str(round_)
            winners.add(writer)
            left = [n for folder in (tmp_path, tmp_path / "out") for n in os.listdir(folder)
                    if n.startswith(TEMP_PREFIX)]
            assert left == [], f"round {round_}: left {left}"
    finally:
        for proc in writers:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in writers:
            assert proc.wait(timeout=60) == 0
    assert winners <= {"A", "B"}
