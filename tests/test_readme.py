"""The README's supported-layer list is the engine's registry (scripts/gen_readme_layers.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_layer_list_matches_registry():
    script = REPO / "scripts" / "gen_readme_layers.py"
    spec = importlib.util.spec_from_file_location("gen_readme_layers", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert module.render(text) == text, "run: python scripts/gen_readme_layers.py"
    from amct_caffe.engine.layers import supported_types

    for layer_type in supported_types():
        assert f"`{layer_type}`" in text
