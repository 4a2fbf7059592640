#!/usr/bin/env python3
"""Rewrite the README's supported-layer list from the engine's registry.

Usage: ``python scripts/gen_readme_layers.py`` (``--check`` exits 1 when the README is out of date).
The list sits between ``<!-- layers:begin -->`` and ``<!-- layers:end -->``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

BEGIN, END = "<!-- layers:begin -->", "<!-- layers:end -->"


def layer_section() -> str:
    """The Markdown list of every Caffe type the engine runs, grouped by the module that implements it."""
    from amct_caffe.engine.layers import layer_class, supported_types

    groups: dict[str, list[str]] = {}
    origins: dict[str, str] = {}
    for name in supported_types():
        cls = layer_class(name)
        module = cls.__module__.rsplit(".", 1)[-1]
        groups.setdefault(module, []).append(name)
        origins[name] = cls.origin
    titles = {
        "data": "Inputs", "data_sources": "Data", "vision": "Vision", "activation": "Activations",
        "normalization": "Normalization", "structure": "Structure", "loss": "Loss and accuracy",
        "ssd": "SSD", "region": "Region-based detection (Fast R-CNN, R-FCN, py-faster-rcnn)",
        "python": "Python layers (pycaffe's, on opt-in)", "quant": "AMCT", "calibration": "AMCT calibration",
        "fork": "Caffe forks",
    }
    order = list(titles) + sorted(set(groups) - set(titles))
    lines = [f"- **{titles.get(m, m)}** ({m}.py): " + _listing(groups[m], origins)
             for m in order if m in groups]
    return "\n".join(lines)


def _listing(types: list[str], origins: dict[str, str]) -> str:
    """The types of one module, grouped by the fork they come from when they name one."""
    if not any(origins[t] for t in types):
        return ", ".join(f"`{t}`" for t in types)
    by_origin: dict[str, list[str]] = {}
    for t in types:
        by_origin.setdefault(origins[t] or "BVLC", []).append(t)
    return "; ".join(f"{origin}: " + ", ".join(f"`{t}`" for t in names)
                     for origin, names in by_origin.items())


def render(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{layer_section()}\n{END}{tail}"


def main() -> int:
    path = REPO / "README.md"
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            print("README.md's layer list is out of date: run python scripts/gen_readme_layers.py")
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
