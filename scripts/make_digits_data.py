"""Write ``src/amct_caffe/data/digits.npz``, the digits data the demo ships (run once; needs scikit-learn).

The data are scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits" test set (1797 grey
8x8 images, values 0..16, 10 classes; E. Alpaydin and C. Kaynak, UCI Machine Learning Repository,
CC BY 4.0). They are stored as ``images`` (1797, 8, 8) uint8 and ``labels`` (1797,) uint8, compressed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "src" / "amct_caffe" / "data" / "digits.npz"


def main() -> None:
    digits = load_digits()
    images = np.asarray(digits.images).astype(np.uint8)
    labels = np.asarray(digits.target).astype(np.uint8)
    assert images.shape == (1797, 8, 8) and int(images.max()) == 16 and labels.shape == (1797,)
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
