"""An independent digit classifier that turns "the images look like digits" into numbers.

Dimension letters: N images, H/W image (28, or 32 with a 2-pixel pad that is cropped), D = 784
pixels, U hidden units, L = 10 labels.

The classifier is scikit-learn's `MLPClassifier` (one hidden layer of 256 ReLU units, Adam,
L2 weight 1e-3) fit on the labelled training split of the dataset: pixels in [0, 1], so a
binarized digit and a Bernoulli mean are both valid inputs. It is never one of our models and
sees no test image while it is fit. Its weights are plain arrays (`ClassifierWeights`), saved as
`.npz` beside the dataset and applied with NumPy, so no pickle is ever loaded.

- `fit` returns the weights; `predict_proba` applies them (the same numbers as sklearn's own
  `predict_proba`, which a test checks);
- `label_accuracy`: the share of images whose most probable class is the given label. On the
  real test images it is the classifier's own accuracy, the ceiling of a reconstruction's;
- `sample_summary`: mean top-class probability and the label histogram of generated images.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from vnca.artifacts import read_npz
from vnca.errors import DataError
from vnca.evaluation import threads
from vnca.fileio import atomic_path

HIDDEN_UNITS = 256
L2_WEIGHT = 1e-3
MAX_EPOCHS = 60
N_LABELS = 10
IMAGE_SIDE = 28
KIND = f"MLP, {HIDDEN_UNITS} ReLU units (scikit-learn)"  # as reports name it


@dataclasses.dataclass(frozen=True)
class ClassifierWeights:
    w1_DxU: np.ndarray
    b1_U: np.ndarray
    w2_UxL: np.ndarray
    b2_L: np.ndarray
    n_train: int
    test_accuracy: float  # on the dataset's real test images (nan if it has none)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            np.savez(tmp, w1_DxU=self.w1_DxU, b1_U=self.b1_U, w2_UxL=self.w2_UxL,
                     b2_L=self.b2_L, n_train=np.int64(self.n_train),
                     test_accuracy=np.float64(self.test_accuracy))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassifierWeights:
        """The weights `save` wrote; anything else (corrupt, truncated, wrong arrays, NaN) is
        one `DataError` line naming the file."""
        def bad(why: str) -> DataError:
            return DataError(f"{path}: unreadable or corrupt digit classifier ({why}); rerun "
                             "`vnca prepare-data`")

        try:
            f = read_npz(path, ("w1_DxU", "b1_U", "w2_UxL", "b2_L", "n_train", "test_accuracy"),
                         "digit classifier")
            w = cls(w1_DxU=f["w1_DxU"], b1_U=f["b1_U"], w2_UxL=f["w2_UxL"], b2_L=f["b2_L"],
                    n_train=int(f["n_train"]), test_accuracy=float(f["test_accuracy"]))
        except DataError as e:
            raise DataError(f"{e}; rerun `vnca prepare-data`") from None
        except (TypeError, ValueError) as e:  # n_train / test_accuracy not scalars
            raise bad(" ".join(str(e).split())) from None
        arrays = (w.w1_DxU, w.b1_U, w.w2_UxL, w.b2_L)
        u = w.b1_U.shape[0] if w.b1_U.ndim == 1 else -1
        if (w.w1_DxU.shape != (IMAGE_SIDE**2, u) or w.w2_UxL.shape != (u, N_LABELS)
                or w.b2_L.shape != (N_LABELS,)):
            raise bad(f"not a {IMAGE_SIDE}x{IMAGE_SIDE} digit classifier")
        if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in arrays):
            raise bad("weights are not all finite floats")
        return w


def pixels(images_NxHxW: np.ndarray) -> np.ndarray:
    """`NxD` float32 pixels of 28x28 images in [0, 1]; a 32x32 image loses its 2-pixel pad."""
    x = np.asarray(images_NxHxW, np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected N x H x W images, got shape {x.shape}")
    side = x.shape[1]
    if side != x.shape[2] or side < IMAGE_SIDE:
        raise ValueError(f"expected square images of at least {IMAGE_SIDE} pixels, got {x.shape}")
    m = (side - IMAGE_SIDE) // 2
    return x[:, m:m + IMAGE_SIDE, m:m + IMAGE_SIDE].reshape(len(x), -1)


def fit(x_NxHxW: np.ndarray, y_N: np.ndarray, seed: int = 0,
        x_test_NxHxW: np.ndarray | None = None,
        y_test_N: np.ndarray | None = None) -> ClassifierWeights:
    """Fit the MLP on (images, labels); its accuracy on the given test images is recorded."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    y = np.asarray(y_N)
    if len(y) == 0 or len(np.unique(y)) < 2:
        raise ValueError("the digit classifier needs labelled images of at least two classes")
    mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), alpha=L2_WEIGHT,
                        max_iter=MAX_EPOCHS, random_state=seed)
    # The labels may not cover all ten digits (a tiny sample): fit on what there is, then
    # give every missing class a logit that never wins.
    with warnings.catch_warnings(), threads.limit(2):  # 2 BLAS threads by default
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(pixels(x_NxHxW), y)
    w2 = np.zeros((HIDDEN_UNITS, N_LABELS), np.float32)
    b2 = np.full(N_LABELS, -1e4, np.float32)
    classes = mlp.classes_.astype(int)
    if len(classes) == 2:  # sklearn keeps one logistic output for two classes
        w2[:, classes[1]] = mlp.coefs_[1][:, 0]
        b2[classes[1]] = mlp.intercepts_[1][0]
        b2[classes[0]] = 0.0
    else:
        w2[:, classes] = mlp.coefs_[1]
        b2[classes] = mlp.intercepts_[1]
    w = ClassifierWeights(w1_DxU=mlp.coefs_[0].astype(np.float32),
                          b1_U=mlp.intercepts_[0].astype(np.float32), w2_UxL=w2, b2_L=b2,
                          n_train=len(y), test_accuracy=float("nan"))
    if x_test_NxHxW is not None and y_test_N is not None and len(y_test_N):
        acc = label_accuracy(predict_proba(w, x_test_NxHxW), y_test_N)
        w = dataclasses.replace(w, test_accuracy=acc)
    return w


def predict_proba(w: ClassifierWeights, images_NxHxW: np.ndarray) -> np.ndarray:
    """`NxL` class probabilities of images with pixels in [0, 1] (28x28 or padded 32x32)."""
    h = np.maximum(pixels(images_NxHxW) @ w.w1_DxU + w.b1_U, 0.0)
    logits = h @ w.w2_UxL + w.b2_L
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def label_accuracy(proba_NxL: np.ndarray, labels_N: np.ndarray) -> float:
    """Share of rows whose most probable class is the label (nan for no rows)."""
    if len(labels_N) == 0:
        return float("nan")
    return float(np.mean(np.argmax(proba_NxL, axis=1) == np.asarray(labels_N)))


def sample_summary(proba_NxL: np.ndarray) -> dict:
    """Mean top-class probability and the histogram of most probable labels."""
    n = len(proba_NxL)
    hist = np.bincount(np.argmax(proba_NxL, axis=1), minlength=N_LABELS) if n else \
        np.zeros(N_LABELS, np.int64)
    return {"n_images": int(n),
            "mean_top_probability": float(proba_NxL.max(axis=1).mean()) if n else float("nan"),
            "label_histogram": [int(c) for c in hist]}
