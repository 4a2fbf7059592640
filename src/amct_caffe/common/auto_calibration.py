"""What a user hands to ``accuracy_based_auto_calibration`` (AMCT reference §1.2): the evaluator base class
and the search strategy and sensitivity measure, as objects or by name.

A user's evaluator subclasses :class:`AutoCalibrationEvaluatorBase`, calls its ``__init__()`` and overrides
the three methods the tool calls::

    class Evaluator(AutoCalibrationEvaluatorBase):
        def __init__(self, data, batch_num, target_loss):
            super().__init__()
            ...
        def calibration(self, model_file, weights_file):      # run batch_num forward batches
            net = caffe.Net(model_file, weights_file, caffe.TEST)
            for batch in self.batches[:self.batch_num]:
                net.forward(data=batch)
        def evaluate(self, model_file, weights_file):         # the model's metric (e.g. top-1)
            ...
        def metric_eval(self, original_metric, new_metric):   # (satisfied, loss)
            loss = (original_metric - new_metric) * 100
            return loss < self.target_loss, loss
"""

from __future__ import annotations

from typing import Any

from amct_caffe.errors import EvaluatorError

__all__ = [
    "STRATEGIES",
    "SENSITIVITIES",
    "AutoCalibrationEvaluatorBase",
    "BinarySearchStrategy",
    "CosineSimilaritySensitivity",
]


class AutoCalibrationEvaluatorBase:
    """Base class of the evaluator ``accuracy_based_auto_calibration`` drives (AMCT's contract).

    Subclasses call ``super().__init__()`` and override :meth:`calibration`, :meth:`evaluate` and
    :meth:`metric_eval`; the base versions raise :class:`~amct_caffe.errors.EvaluatorError`.
    """

    def __init__(self) -> None:
        """Nothing to set up; subclasses keep their own data and settings."""

    def calibration(self, model_file: str, weights_file: str) -> None:
        """Run the calibration forwards of the given model: ``batch_num`` batches (the quant config's
        ``batch_num``), so that its IFMR layers write the activation factors into the record.

        Args:
            model_file: the calibration prototxt the tool wrote.
            weights_file: its caffemodel.

        Raises:
            EvaluatorError: not overridden.
        """
        raise EvaluatorError(_not_overridden(self, "calibration(self, model_file, weights_file)"))

    def evaluate(self, model_file: str, weights_file: str) -> Any:
        """The evaluation metric (e.g. top-1 accuracy) of the given model.

        Args:
            model_file: a prototxt (the float model, or a fake-quant model the tool wrote).
            weights_file: its caffemodel.

        Returns:
            The metric, in whatever form :meth:`metric_eval` compares.

        Raises:
            EvaluatorError: not overridden.
        """
        raise EvaluatorError(_not_overridden(self, "evaluate(self, model_file, weights_file)"))

    def metric_eval(self, original_metric: Any, new_metric: Any) -> tuple[bool, float]:
        """Whether the quantized model's metric is good enough compared with the float model's.

        Args:
            original_metric: what :meth:`evaluate` returned for the float model.
            new_metric: what it returned for a fake-quant model.

        Returns:
            ``(satisfied, loss)``: ``satisfied`` True when the accuracy goal holds; ``loss`` a number,
            smaller is better (AMCT's sample: ``(original - new) * 100``).

        Raises:
            EvaluatorError: not overridden.
        """
        raise EvaluatorError(_not_overridden(self, "metric_eval(self, original_metric, new_metric)"))


def _not_overridden(evaluator: object, method: str) -> str:
    return (f"The evaluator {type(evaluator).__name__} does not override {method}; subclasses of "
            "AutoCalibrationEvaluatorBase must define calibration, evaluate and metric_eval.")


class BinarySearchStrategy:
    """Search strategy ``'BinarySearch'``: with the quantized layers ranked most sensitive first, find by
    binary search the smallest number ``k`` of leading layers that, kept float, let ``metric_eval`` be
    satisfied (each probe a full calibration and evaluation). Assumes that keeping more layers float never
    makes the metric worse."""

    name = "BinarySearch"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CosineSimilaritySensitivity:
    """Sensitivity measure ``'CosineSimilarity'``: for each quantized layer, the cosine similarity between
    the net outputs of the float model and of the model with only that layer quantized, over the calibration
    batches the evaluator feeds. A lower cosine is a more sensitive layer."""

    name = "CosineSimilarity"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: The accepted names of the ``strategy`` and ``sensitivity`` arguments.
STRATEGIES: dict[str, type[BinarySearchStrategy]] = {BinarySearchStrategy.name: BinarySearchStrategy}
SENSITIVITIES: dict[str, type[CosineSimilaritySensitivity]] = {
    CosineSimilaritySensitivity.name: CosineSimilaritySensitivity}
