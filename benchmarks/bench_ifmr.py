"""IFMR alone: the fast exact search of ``amct_caffe.quant.ifmr`` against the brute-force search it reproduces
(``tests/references/ifmr.py``: every candidate quantizes every value).

Data (seed 0): ``--values`` float32 values of each kind -- ReLU outputs (half zeros), normal, skewed
(exponential) -- as one IFMR layer gathers them. For each kind: the fast search's time (median of
``--repeats``), the brute-force search's (one run; it checks that both give the same factors), and how many
candidates the fast search had to decide by their exact loss. Interleaved in one process, after a warm-up.

    PYTHONPATH=src python benchmarks/bench_ifmr.py --values 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    opts = parser.parse_args()
    sys.path[:0] = [str(REPO / "src"), str(REPO)]
    import torch

    from amct_caffe.quant import ifmr as fast
    from tests.references.ifmr import ifmr_exact

    if opts.threads:
        torch.set_num_threads(opts.threads)
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(opts.values, generator=gen)
    kinds = {"relu": torch.relu(normal * 3), "normal": normal,
             "skewed": torch.empty(opts.values).exponential_(1.0, generator=gen)}
    decided: list[int] = []
    bounds = fast._loss_bounds

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        lower, upper = bounds(*args, **kwargs)
        decided.append(int((lower <= upper.min()).sum()))
        return lower, upper

    fast._loss_bounds = counting
    fast.ifmr(kinds["relu"][:1000])  # warm-up
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {opts.values} values; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| data | fast s | brute force s | speed-up | same factors | candidates decided exactly |")
    print("|---|---|---|---|---|---|")
    for name, x in kinds.items():
        times = []
        for _ in range(opts.repeats):
            decided.clear()
            start = time.perf_counter()
            s, o = fast.ifmr(x)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        s_ref, o_ref, _ = ifmr_exact([x])
        brute = time.perf_counter() - start
        same = s.item() == s_ref.item() and o.item() == o_ref.item()
        t = statistics.median(times)
        exact = decided[0] if decided and decided[0] > 1 else 0
        print(f"| {name} | {t:.3f} | {brute:.2f} | {brute / t:.0f}x | {same} | {exact} |")


if __name__ == "__main__":
    main()
