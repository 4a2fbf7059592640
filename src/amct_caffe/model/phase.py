"""Caffe's include/exclude rules: the TRAIN or TEST view of a net (Caffe's ``Net::FilterNet``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from amct_caffe.errors import ModelFormatError
from amct_caffe.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def rule_matches(rule: caffe_pb2.NetStateRule, phase: int, level: int, stages: set[str]) -> bool:
    """True when the net state (phase, level, stages) satisfies ``rule`` (Caffe's ``StateMeetsRule``)."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def layer_included(layer: caffe_pb2.LayerParameter, phase: int, level: int, stages: set[str]) -> bool:
    """Caffe keeps a layer with include rules if one matches, else unless an exclude rule matches."""
    if layer.include:
        return any(rule_matches(r, phase, level, stages) for r in layer.include)
    return not any(rule_matches(r, phase, level, stages) for r in layer.exclude)


def filter_net(
    net: caffe_pb2.NetParameter,
    phase: int | None = None,
    level: int | None = None,
    stages: Iterable[str] | None = None,
    path: str = "",
) -> caffe_pb2.NetParameter:
    """Return a copy of ``net`` holding only the layers active in the given state.

    Args:
        net: a V2 NetParameter.
        phase: ``TRAIN`` or ``TEST``; default: ``net.state.phase`` (Caffe's default is TEST).
        level, stages: the NetState level and stages; default: those of ``net.state``.
        path: the file the net came from, for error messages.

    Returns:
        A new NetParameter whose ``state`` holds the phase used and whose layers are the active ones.

    Raises:
        ModelFormatError: a layer has both include and exclude rules (Caffe refuses that too).
    """
    phase = net.state.phase if phase is None else phase
    level = net.state.level if level is None else level
    stage_set = set(net.state.stage if stages is None else stages)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    out.state.phase = cast(caffe_pb2.Phase, phase)  # an enum field holds the plain int value
    out.state.level = level
    del out.state.stage[:]
    out.state.stage.extend(sorted(stage_set))
    for layer in net.layer:
        if layer.include and layer.exclude:
            raise ModelFormatError(
                f"Layer '{layer.name}' in '{path or net.name}' has both include and exclude rules; "
                "Caffe allows only one of them. Keep one kind of rule."
            )
        if layer_included(layer, phase, level, stage_set):
            out.layer.add().CopyFrom(layer)
    return out


def restore_state(view: caffe_pb2.NetParameter, original: caffe_pb2.NetParameter) -> None:
    """Give a phase view that will be written as a prototxt the original net's ``state`` back
    (:func:`filter_net` stamps the phase it filtered for into its copy)."""
    if original.HasField("state"):
        view.state.CopyFrom(original.state)
    else:
        view.ClearField("state")
