"""The record file's shapes during QAT training: an explicit step run after a forward, not a layer's side
effect.

AMCT's retrain layer writes, on its first forward, the input (channels, height, width) of its quantized
layers into the record file its parameter names (``retrain_data_quant_param.record_file_path``). Here the
``ActivationQAT`` layer only remembers its bottom's shape (``input_shape``); a :class:`RecordShapesHook`
writes it, once per layer, when its owner calls :meth:`RecordShapesHook.after_forward`. The solver installs
one on each of its nets (train and test), so ``caffe.SGDSolver(retrain_solver).solve()`` updates the record
as AMCT's does; a net built and run by itself (the workflows' shape inference, ``caffe.Net``) writes
nothing. ``save_quant_retrain_model`` never reads these shapes: it infers them again.

The file is updated in place (``quant.record.update_shapes``: update-or-append, every other field and entry
kept; AMCT truncates the file at setup, we never truncate, so a record shared by several nets keeps its
other entries). ``object_layer`` names are split at every ``-`` (AMCT's format), so a consumer whose name
contains ``-`` is recorded under its pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

from amct_caffe.engine.layers.quant import ActivationQAT
from amct_caffe.engine.net import Net
from amct_caffe.log import get_logger
from amct_caffe.quant.record import legacy_chw, update_shapes

LOGGER = get_logger("engine.record_shapes")


class RecordShapesHook:
    """Writes the record shapes of ``ActivationQAT`` layers after their first real forward.

    Args:
        layers: the layers to watch; those without ``record_file_path`` or ``object_layer`` are ignored.

    Attributes:
        pending: the layers whose shapes are not written yet, in net order.
    """

    def __init__(self, layers: Sequence[ActivationQAT]) -> None:
        self.pending: list[ActivationQAT] = [
            layer for layer in layers if layer.record_file_path and layer.object_layers
        ]

    @classmethod
    def for_net(cls, net: Net) -> RecordShapesHook:
        """A hook watching every ``ActivationQAT`` of ``net`` (none: a hook that does nothing)."""
        return cls([layer for layer in net.engine_layers if isinstance(layer, ActivationQAT)])

    def after_forward(self) -> None:
        """Write the shapes of the pending layers that have run a real forward; each layer is written once.

        Raises:
            RecordError: a record file exists but does not parse (``update_shapes``).
        """
        waiting: list[ActivationQAT] = []
        by_file: dict[str, dict[str, tuple[int, int, int]]] = {}
        for layer in self.pending:
            if layer.input_shape is None:
                waiting.append(layer)
                continue
            chw = legacy_chw(layer.input_shape)
            if chw is None:
                LOGGER.debug("Layer '%s': the input has more than 4 axes; no shape recorded.", layer.name)
                continue
            by_file.setdefault(layer.record_file_path, {}).update((name, chw) for name in layer.object_layers)
        self.pending = waiting
        for path, shapes in by_file.items():
            update_shapes(path, shapes)
