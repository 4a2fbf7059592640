"""Runs inside the real Caffe's venv (see real_caffe.py): run a pycaffe script unchanged, as
``python _real_caffe_script.py SCRIPT ARGS...``.

The reference's ``caffe/io.py`` was written for an older scikit-image: it calls ``resize`` without importing
it (``from skimage.transform import resize`` in pycaffe's sources) and passes ``as_grey`` (now ``as_gray``)
to ``skimage.io.imread``. Both are put back here, so the script runs the code pycaffe intends.
"""

import runpy
import sys


def main() -> None:
    import caffe.io
    import skimage.io
    import skimage.transform

    caffe.io.resize = skimage.transform.resize
    imread = skimage.io.imread

    def imread_as_grey(fname, *args, **kwargs):
        if "as_grey" in kwargs:
            kwargs["as_gray"] = kwargs.pop("as_grey")
        return imread(fname, *args, **kwargs)

    skimage.io.imread = imread_as_grey
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
