"""Write diffsolve/data/digits.npz from scikit-learn's copy of the UCI 8x8 digits.

Development-time only (scikit-learn is not a dependency of diffsolve):
    pip install scikit-learn && python scripts/make_digits_file.py
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

out = Path(__file__).resolve().parents[1] / "diffsolve" / "data" / "digits.npz"
d = load_digits()
np.savez_compressed(out, images=d.data.reshape(-1, 8, 8).astype(np.uint8), labels=d.target.astype(np.uint8))
print(f"wrote {out} ({out.stat().st_size} bytes): {d.data.shape[0]} images")
