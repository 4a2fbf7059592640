"""Runs inside the real Caffe's venv (see real_caffe.py): forward one net, dump every blob and param."""

import sys

import numpy as np


def main() -> None:
    net_file, inputs_file, out_file, phase, weights, save_weights = sys.argv[1:7]
    import caffe

    caffe.set_mode_cpu()
    ph = caffe.TEST if phase == "TEST" else caffe.TRAIN
    net = caffe.Net(net_file, ph) if weights == "-" else caffe.Net(net_file, weights, ph)
    inputs = np.load(inputs_file)
    for name in inputs.files:
        net.blobs[name].reshape(*inputs[name].shape)
    if inputs.files:
        net.reshape()
    for name in inputs.files:
        net.blobs[name].data[...] = inputs[name]
    net.forward()
    out = {}
    for name, blob in net.blobs.items():
        out["blob:" + name] = np.array(blob.data)
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            out[f"param:{name}/{i}"] = np.array(b.data)
    np.savez(out_file, **out)
    if save_weights != "-":
        net.save(save_weights)


if __name__ == "__main__":
    main()
