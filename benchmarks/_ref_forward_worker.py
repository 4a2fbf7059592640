"""Times forwards of the reference Caffe; run by the reference venv's python (see bench_forward.py).

The reference aborts its whole process on bad input, so the benchmark never imports it: it starts this
script once and sends one JSON command per line on stdin; every reply is one JSON line on stdout.

Commands:
    {"cmd": "load", "prototxt": p, "weights": w, "input": npy}  build the TEST net with the weights,
        reshape the input blob to the array's shape and copy the array in
    {"cmd": "time", "iters": n}    run n forwards, reply {"times": [seconds per forward]}
    {"cmd": "outputs", "blobs": [names], "path": npz}  save those blobs (after the last forward)
    {"cmd": "quit"}
"""

import json
import os
import sys
import time

import numpy as np


def main() -> None:
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe

    caffe.set_mode_cpu()
    out = sys.stdout
    sys.stdout = sys.stderr  # anything Caffe's python side prints must not break the protocol
    net = None
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            break
        reply: dict = {"ok": True}
        if cmd == "load":
            net = caffe.Net(msg["prototxt"], msg["weights"], caffe.TEST)
            x = np.load(msg["input"])
            name = net.inputs[0]
            net.blobs[name].reshape(*x.shape)
            net.reshape()
            net.blobs[name].data[...] = x
            reply["outputs"] = list(net.outputs)
        elif cmd == "time":
            times = []
            for _ in range(int(msg["iters"])):
                start = time.perf_counter()
                net.forward()
                times.append(time.perf_counter() - start)
            reply["times"] = times
        elif cmd == "outputs":
            np.savez(msg["path"], **{b: np.array(net.blobs[b].data) for b in msg["blobs"]})
        else:
            reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
