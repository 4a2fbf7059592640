"""Upgrade old Caffe net definitions to the current (V2) format, as Caffe's ``UpgradeNetAsNeeded`` does.

Caffe upgrades every NetParameter it reads (text prototxt or binary caffemodel) through a fixed chain of steps
in ``src/caffe/util/upgrade_proto.cpp``; :func:`upgrade_net` runs the same chain, in the same order, in place:

1. V0 -> V1: ``layers { layer { type: "conv" ... } }`` (the 2013 ``V0LayerParameter``, nested in a V1 layer
   as field 1). Padding layers are folded into the conv/pool layer that reads them, then each V0 layer's flat
   fields are moved into the V1 per-type parameter messages.
2. Data transformation: the pre-``transform_param`` fields ``scale``, ``mean_file``, ``crop_size`` and
   ``mirror`` of V1 Data/ImageData/WindowData layers move into ``transform_param``.
3. V1 -> V2: ``layers { type: CONVOLUTION }`` becomes ``layer { type: "Convolution" }``; ``param`` names,
   ``blob_share_mode``, ``blobs_lr`` and ``weight_decay`` merge by index into ``ParamSpec`` messages.
4. Net inputs: the deprecated ``input:`` + ``input_shape``/``input_dim`` fields become one ``Input`` layer
   named ``input``, placed first.
5. BatchNorm: a BatchNorm layer with exactly three ``param`` messages (the pre-2016 way of freezing its
   statistics) loses them; the layer now freezes its blobs itself.

Where Caffe aborts (a glog CHECK or LOG(FATAL)) we raise :class:`ModelFormatError` naming the file and the
layer. This module works on protobuf messages only (no torch).
"""

from __future__ import annotations

import logging

from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message

from amct_caffe.errors import ModelFormatError, where
from amct_caffe.log import get_logger, log_once
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("model.upgrade")

_V1 = caffe_pb2.V1LayerParameter

#: V1 layer type enum name -> V2 type string, as Caffe's ``UpgradeV1LayerType`` maps them. ``NONE`` is absent
#: on purpose: Caffe turns it into the empty type, which no layer factory knows.
V1_TYPE_TO_V2: dict[str, str] = {
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

#: V0 type string -> V1 type enum name (Caffe's ``UpgradeV0LayerType``); "padding" layers are folded away
#: before.
V0_TYPE_TO_V1: dict[str, str] = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

#: V0 field -> {V0 type: (V1 parameter message, field in it)}, as ``UpgradeV0LayerParameter`` moves them.
#: A V0 field set on a layer type not listed is dropped with a warning (Caffe: "Unknown parameter ... for
#: layer type"; it continues anyway).
_V0_FIELD_MAP: dict[str, dict[str, tuple[str, str]]] = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"), "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"), "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "batchsize": {"data": ("data_param", "batch_size"), "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", "")},
}

#: V0 fields that go to ``transform_param`` whatever the layer type (V0 -> TransformationParameter field).
_V0_TRANSFORM_FIELDS = {
    "scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size", "mirror": "mirror",
}

#: V0 fields Caffe's upgrade reads elsewhere or silently ignores (``new_num``/``new_channels``: never used).
_V0_OTHER_FIELDS = {"name", "type", "blobs", "blobs_lr", "weight_decay", "new_num", "new_channels"}

#: V1 data layer types whose parameter message carries the pre-``transform_param`` fields, with that message.
_DATA_TRANSFORM_LAYERS = {
    _V1.DATA: "data_param",
    _V1.IMAGE_DATA: "image_data_param",
    _V1.WINDOW_DATA: "window_data_param",
}
_DATA_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

#: V1 per-type parameter messages; each is copied to the LayerParameter field of the same name.
_V1_PARAM_FIELDS = tuple(
    f.name for f in _V1.DESCRIPTOR.fields
    if f.name.endswith("_param") and f.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE
)


def _note_once(path: str, what: str, message: str) -> None:
    """An upgrade note at INFO, once per file and kind in a process (a file is read many times)."""
    log_once(LOGGER, logging.INFO, ("upgrade", path, what), message, path)


def upgrade_net(net: caffe_pb2.NetParameter, path: str) -> None:
    """Upgrade ``net`` in place to the V2 format, as Caffe's ``UpgradeNetAsNeeded`` does to each net it reads.

    Args:
        net: a parsed prototxt or caffemodel.
        path: the file it came from, for log and error messages.

    Raises:
        ModelFormatError: the net cannot be upgraded (both ``layer`` and ``layers`` filled, an unknown V0 or
            V1 layer type, a misplaced V0 padding layer, inconsistent input dimensions).
    """
    if len(net.layer) and len(net.layers):
        # Caffe's UpgradeV1Net: LOG(FATAL) "Refusing to upgrade inconsistent NetParameter input".
        raise ModelFormatError(
            f"Net '{path}' defines both 'layer' (V2) and 'layers' (V1) entries; Caffe refuses such a file. "
            "Rewrite the 'layers { type: CONVOLUTION ... }' entries as 'layer { type: \"Convolution\" ... }'."
        )
    if any(v1.HasField("layer") for v1 in net.layers):
        _note_once(path, "V0", "Upgrading '%s' from the deprecated V0LayerParameter format.")
        _upgrade_v0_net(net, path)
    if _needs_data_upgrade(net):
        _note_once(path, "transform_param",
                   "Upgrading '%s' from deprecated data transformation fields to transform_param.")
        _upgrade_data_transformation(net)
    if len(net.layers):
        _note_once(path, "V1", "Upgrading '%s' from the deprecated V1LayerParameter ('layers') format.")
        _upgrade_v1_net(net, path)
    if len(net.input) or len(net.input_shape) or len(net.input_dim):
        _note_once(path, "input fields",
                   "Upgrading '%s' from deprecated net 'input' fields (to an Input layer).")
        _upgrade_input(net, path)
    if any(_batch_norm_needs_upgrade(lp) for lp in net.layer):
        _note_once(path, "BatchNorm param",
                   "Upgrading '%s': removing the 'param' entries of BatchNorm layers (Caffe fixes them).")
        for lp in net.layer:
            if _batch_norm_needs_upgrade(lp):
                del lp.param[:]


# -- V0 -> V1 --------------------------------------------------------------------------------------------

def _label(name: str, index: int) -> str:
    return name if name else f"#{index} (unnamed)"


def _upgrade_v0_net(net: caffe_pb2.NetParameter, path: str) -> None:
    """Caffe's ``UpgradeV0Net``: fold padding layers, then rewrite every layer as a V1 layer.

    Net-level fields (name, inputs, force_backward, ...) are kept as they are.
    """
    wrappers = _fold_v0_padding_layers(net, path)
    upgraded = [_upgrade_v0_layer(w, i, path) for i, w in enumerate(wrappers)]
    del net.layers[:]
    net.layers.extend(upgraded)


def _fold_v0_padding_layers(net: caffe_pb2.NetParameter, path: str) -> list[caffe_pb2.V1LayerParameter]:
    """Caffe's ``UpgradeV0PaddingLayers``: drop each V0 "padding" layer and give its ``pad`` to its reader.

    The reader of a padding layer's output must be a single-input conv or pool layer and the padding layer
    must have one bottom and one top (Caffe CHECKs; other cases had undefined behaviour in Caffe).
    """
    out: list[caffe_pb2.V1LayerParameter] = []
    last_top: dict[str, int] = {name: -1 for name in net.input}
    for i, conn in enumerate(net.layers):
        v0 = conn.layer
        label = _label(v0.name or conn.name, i)
        if v0.type != "padding":
            copy = caffe_pb2.V1LayerParameter()
            copy.CopyFrom(conn)
            out.append(copy)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise ModelFormatError(
                    f"V0 net {where(path, label)}: bottom '{blob}' is produced by no earlier layer or "
                    "net input; fix the blob name or the layer order."
                )
            src_index = last_top[blob]
            if src_index < 0:
                continue
            source = net.layers[src_index]
            if source.layer.type != "padding":
                continue
            if v0.type not in ("conv", "pool"):
                raise ModelFormatError(
                    f"V0 net {where(path, label)}: a 'padding' layer feeds this '{v0.type}' layer; "
                    "Caffe only upgrades padding layers that feed a 'conv' or 'pool' layer."
                )
            if len(conn.bottom) != 1 or len(source.bottom) != 1 or len(source.top) != 1:
                raise ModelFormatError(
                    f"V0 net {where(path, label)}: the padding layer '{source.layer.name}' and the layer it "
                    "feeds must each have exactly one bottom (and the padding layer one top) to be upgraded."
                )
            out[-1].layer.pad = source.layer.pad
            out[-1].bottom[j] = source.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    return out


def _set_field(msg: Message, field: str, value: object) -> None:
    """Set ``msg.field`` to ``value``: append to a repeated field (conv pad/kernel_size/stride), copy a
    message (fillers), assign a scalar."""
    fd = msg.DESCRIPTOR.fields_by_name[field]
    repeated = getattr(fd, "is_repeated", None)  # protobuf >= 6; older versions only have ``label``
    if repeated is None:
        repeated = fd.label == pb_descriptor.FieldDescriptor.LABEL_REPEATED
    if repeated:
        getattr(msg, field).append(value)
    elif fd.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, field).CopyFrom(value)
    else:
        setattr(msg, field, value)


def _upgrade_v0_layer(conn: caffe_pb2.V1LayerParameter, index: int, path: str) -> caffe_pb2.V1LayerParameter:
    """Caffe's ``UpgradeV0LayerParameter``: one V1 layer from a V1 wrapper holding a V0 ``layer``.

    Only ``bottom``/``top`` of the wrapper survive (as in Caffe); everything else comes from the V0 layer.
    """
    v1 = caffe_pb2.V1LayerParameter()
    v1.bottom.extend(conn.bottom)
    v1.top.extend(conn.top)
    if not conn.HasField("layer"):
        return v1
    v0 = conn.layer
    label = _label(v0.name or conn.name, index)
    if v0.HasField("name"):
        v1.name = v0.name
    if v0.HasField("type"):
        if v0.type not in V0_TYPE_TO_V1:
            raise ModelFormatError(
                f"V0 net {where(path, label)}: unknown V0 layer type '{v0.type}' (known: "
                f"{', '.join(sorted(V0_TYPE_TO_V1))}); upgrade the net with Caffe's upgrade_net_proto_text "
                "tool."
            )
        v1.type = _V1.LayerType.Value(V0_TYPE_TO_V1[v0.type])
    v1.blobs.extend(v0.blobs)
    v1.blobs_lr.extend(v0.blobs_lr)
    v1.weight_decay.extend(v0.weight_decay)
    for fd, value in v0.ListFields():
        name = fd.name
        if name in _V0_OTHER_FIELDS:
            continue
        if name in _V0_TRANSFORM_FIELDS:
            setattr(v1.transform_param, _V0_TRANSFORM_FIELDS[name], value)
            continue
        targets = _V0_FIELD_MAP.get(name, {})
        if v0.type not in targets:
            LOGGER.warning(
                "V0 net %s: parameter '%s' does not apply to layer type '%s'; dropped (as Caffe does).",
                where(path, label), name, v0.type,
            )
            continue
        param_name, field = targets[v0.type]
        param = getattr(v1, param_name)
        if not field:
            param.CopyFrom(value)
        elif name == "pool":
            method = fd.enum_type.values_by_number[value].name
            param.pool = caffe_pb2.PoolingParameter.PoolMethod.Value(method)
        else:
            _set_field(param, field, value)
    return v1


# -- data transformation fields ----------------------------------------------------------------------------

def _needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """Caffe's ``NetNeedsDataUpgrade``: a V1 data layer sets a transformation field in its own parameter."""
    for v1 in net.layers:
        param_name = _DATA_TRANSFORM_LAYERS.get(v1.type)
        if param_name and v1.HasField(param_name):
            param = getattr(v1, param_name)
            if any(param.HasField(f) for f in _DATA_TRANSFORM_FIELDS):
                return True
    return False


def _upgrade_data_transformation(net: caffe_pb2.NetParameter) -> None:
    """Caffe's ``UpgradeNetDataTransformation``: move scale/mean_file/crop_size/mirror into transform_param.

    Like Caffe (which calls ``mutable_*``), every V1 Data/ImageData/WindowData layer ends up with its
    parameter message and a ``transform_param``, even an empty one.
    """
    for v1 in net.layers:
        param_name = _DATA_TRANSFORM_LAYERS.get(v1.type)
        if not param_name:
            continue
        param = getattr(v1, param_name)
        param.SetInParent()
        transform = v1.transform_param
        transform.SetInParent()
        for f in _DATA_TRANSFORM_FIELDS:
            if param.HasField(f):
                setattr(transform, f, getattr(param, f))
                param.ClearField(f)


# -- V1 -> V2 ----------------------------------------------------------------------------------------------

def _upgrade_v1_net(net: caffe_pb2.NetParameter, path: str) -> None:
    """Caffe's ``UpgradeV1Net``: every ``layers`` entry becomes a ``layer`` entry; ``layers`` is cleared."""
    upgraded = [upgrade_v1_layer(v1, i, path) for i, v1 in enumerate(net.layers)]
    del net.layers[:]
    del net.layer[:]
    net.layer.extend(upgraded)


def upgrade_v1_layer(
    v1: caffe_pb2.V1LayerParameter, index: int = 0, path: str = ""
) -> caffe_pb2.LayerParameter:
    """Caffe's ``UpgradeV1LayerParameter``: the V2 ``LayerParameter`` equivalent to one V1 layer.

    ``param`` (names), ``blob_share_mode``, ``blobs_lr`` and ``weight_decay`` merge by index into
    ``ParamSpec`` messages: the i-th ParamSpec gets whichever of the four lists has an i-th entry, so lists
    of different lengths give ParamSpecs with only some fields set, as in Caffe.

    Raises:
        ModelFormatError: the layer has no type or type ``NONE`` (Caffe would fail to create it).
    """
    label = _label(v1.name, index)
    lp = caffe_pb2.LayerParameter()
    lp.bottom.extend(v1.bottom)
    lp.top.extend(v1.top)
    if v1.HasField("name"):
        lp.name = v1.name
    lp.include.extend(v1.include)
    lp.exclude.extend(v1.exclude)
    type_name = _V1.LayerType.Name(v1.type) if v1.HasField("type") else "NONE"
    if type_name not in V1_TYPE_TO_V2:
        raise ModelFormatError(
            f"V1 net {where(path, label)}: the layer has type {type_name} (or none at all), which no "
            "Caffe layer has; give it a V1 type such as CONVOLUTION, or rewrite it as "
            "'layer { type: \"...\" }'."
        )
    lp.type = V1_TYPE_TO_V2[type_name]
    lp.blobs.extend(v1.blobs)

    def spec(i: int) -> caffe_pb2.ParamSpec:
        while len(lp.param) <= i:
            lp.param.add()
        return lp.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(_V1.DimCheckMode.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    lp.loss_weight.extend(v1.loss_weight)
    for name in _V1_PARAM_FIELDS:
        if v1.HasField(name):
            getattr(lp, name).CopyFrom(getattr(v1, name))
    if v1.HasField("layer"):
        # Caffe: "Input NetParameter has V0 layer -- ignoring." (cannot happen after the V0 upgrade).
        LOGGER.warning("V1 net %s: a leftover V0 'layer' field is ignored.", where(path, label))
    return lp


# -- net inputs --------------------------------------------------------------------------------------------

def _upgrade_input(net: caffe_pb2.NetParameter, path: str) -> None:
    """Caffe's ``UpgradeNetInput``: the deprecated net inputs become one ``Input`` layer placed first.

    The layer is named "input" and has one top per ``input`` name; ``input_shape`` (one BlobShape per input)
    wins over ``input_dim`` (4 values per input, N C H W). Inputs with neither (how old caffemodels record
    them) are simply dropped: the weights file does not need them. Caffe indexes the shape lists without a
    bounds check, so a count that does not match the inputs is an error here.
    """
    names = list(net.input)
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if not names and (has_shape or has_dim):
        LOGGER.warning("Net '%s' gives input_shape/input_dim but no 'input' names; they are ignored.", path)
    elif has_shape or has_dim:
        if has_shape and has_dim:
            LOGGER.warning(
                "Net '%s' gives both input_shape and input_dim; input_shape is used (as Caffe does).", path
            )
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        layer.top.extend(names)
        if has_shape:
            if len(net.input_shape) != len(names):
                raise ModelFormatError(
                    f"Net '{path}' names {len(names)} input(s) but gives {len(net.input_shape)} "
                    "input_shape(s); give one input_shape per input."
                )
            layer.input_param.shape.extend(net.input_shape)
        else:
            if len(net.input_dim) != 4 * len(names):
                raise ModelFormatError(
                    f"Net '{path}' names {len(names)} input(s) but gives {len(net.input_dim)} "
                    "input_dim value(s); give exactly 4 input_dim values (N, C, H, W) per input, or use "
                    "input_shape."
                )
            for i in range(len(names)):
                layer.input_param.shape.add().dim.extend(net.input_dim[4 * i:4 * i + 4])
        if hasattr(net.layer, "insert"):
            net.layer.insert(0, layer)
        else:  # protobuf runtimes without insert on message lists: rebuild the list
            rest = []
            for lp in net.layer:
                copy = caffe_pb2.LayerParameter()
                copy.CopyFrom(lp)
                rest.append(copy)
            del net.layer[:]
            net.layer.append(layer)
            net.layer.extend(rest)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


# -- BatchNorm ---------------------------------------------------------------------------------------------

def _batch_norm_needs_upgrade(lp: caffe_pb2.LayerParameter) -> bool:
    """Caffe's ``NetNeedsBatchNormUpgrade``: a BatchNorm layer that declares exactly three ParamSpecs.

    Before 2016 a BatchNorm layer had to say ``param { lr_mult: 0 }`` three times to keep its statistics out
    of the solver; Caffe's BatchNorm now does that itself (and CHECKs that any given lr_mult is 0). The
    reference Caffe's upgrade clears all three entries whatever their values (names included, so the layers
    share nothing; checked against it); later BVLC versions set lr_mult/decay_mult to 0 instead. We follow
    the reference.
    """
    return lp.type == "BatchNorm" and len(lp.param) == 3
