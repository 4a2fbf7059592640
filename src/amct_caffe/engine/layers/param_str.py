"""Parameters a layer reads from ``python_param.param_str``: a mapping written as literals, never code.

Caffe's Python layers take their parameters as one string, and each project picked a format (py-faster-rcnn
YAML, AMCT's pycaffe layers JSON). A user's own layer (:mod:`amct_caffe.engine.layers.custom`) and
py-faster-rcnn's proposal layer read theirs through :func:`parse_param_str`, which evaluates nothing.
"""

from __future__ import annotations

import ast
import json
import re

from amct_caffe.errors import ModelFormatError

#: A key of the YAML block style: a plain name.
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def parse_param_str(text: str, where: str) -> dict[str, object]:
    """A ``param_str`` as a dict, read as literals only (JSON, then ``ast.literal_eval``: no code runs).

    Accepts a JSON object (``{"alpha": 2}``), a Python dict literal, ``key: value`` pairs separated by
    commas (py-faster-rcnn's ``'feat_stride': 16``, YAML's flow style) or one pair per line (YAML's block
    style, keys quoted or not).

    Raises:
        ModelFormatError: the text is not such a mapping (``where`` names the layer).
    """
    body = text.strip()
    if not body:
        return {}
    try:
        as_json = json.loads(body)
    except ValueError:
        as_json = None
    if isinstance(as_json, dict):
        return {str(k): v for k, v in as_json.items()}
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    for candidate in (body, "{" + body + "}", "{" + ", ".join(lines) + "}"):
        value = _literal(candidate)
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    pairs: dict[str, object] = {}
    for line in lines:
        key, sep, raw = line.partition(":")
        key = key.strip().strip("'\"")
        if not sep or not _KEY.fullmatch(key) or not raw.strip():
            break
        pairs[key] = _scalar(raw.strip())
    else:
        return pairs
    raise ModelFormatError(f"{where}: param_str {text!r} is not a mapping such as \"'feat_stride': 16\" or "
                           '\'{"alpha": 2}\'.')


def _scalar(text: str) -> object:
    """A YAML block-style value: a literal, ``true``/``false``, else the text itself as a string."""
    value = _literal(text)
    if value is not None:
        return value
    return {"true": True, "false": False}.get(text.lower(), text)


def _literal(text: str) -> object:
    """``text`` as a Python literal, or None when it is not one (nothing is evaluated but literals)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
