"""The independent digit classifier behind reconstruction accuracy and sample labels:
hand-computed cases (a perfect reconstruction scores the classifier's own accuracy, a constant
image scores chance), its NumPy forward pass against scikit-learn's, and its file format."""

import numpy as np
import pytest

from vnca.data.bundled_source import read_bundled
from vnca.errors import DataError
from vnca.evaluation import classifier


@pytest.fixture(scope="module")
def digits():
    """The bundled sample's binarized images with their matched labels, and a classifier fit
    on 600 of the training images (seconds)."""
    from vnca.data.prepare import match_all

    arrays, _ = match_all(read_bundled(), progress=False)
    x, y = arrays["train_x"][:600], arrays["train_y"][:600]
    xt, yt = arrays["test_x"], arrays["test_y"]
    w = classifier.fit(x, y, seed=0, x_test_NxHxW=xt, y_test_N=yt)
    return w, x, y, xt, yt


def test_perfect_reconstructions_score_the_classifiers_own_accuracy(digits):
    w, _, _, xt, yt = digits
    assert 0.75 < w.test_accuracy < 1.0      # a real classifier, not a constant
    # Reconstructions equal to the originals, padded to 32x32 as the models output them.
    padded = np.pad(xt.astype(np.float32), ((0, 0), (2, 2), (2, 2)))
    acc = classifier.label_accuracy(classifier.predict_proba(w, padded), yt)
    assert acc == pytest.approx(w.test_accuracy)
    # By hand: the share of argmax == label.
    hand = np.mean([np.argmax(p) == t for p, t in zip(classifier.predict_proba(w, xt), yt)])
    assert acc == pytest.approx(hand)


def test_a_constant_image_scores_chance_on_balanced_labels(digits):
    w = digits[0]
    labels = np.repeat(np.arange(10), 7)     # 70 images, 7 of each digit
    for value in (0.0, 0.3, 1.0):
        grey = np.full((len(labels), 28, 28), value, np.float32)
        proba = classifier.predict_proba(w, grey)
        assert len(set(np.argmax(proba, 1))) == 1      # one answer for identical images
        assert classifier.label_accuracy(proba, labels) == pytest.approx(0.1)


def test_numpy_forward_pass_equals_sklearn():
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = (rng.random((200, 28, 28)) < 0.2).astype(np.uint8)
    y = rng.integers(0, 10, 200)
    x[np.arange(200), y, y] = 1              # something learnable
    w = classifier.fit(x, y, seed=3)
    mlp = MLPClassifier(hidden_layer_sizes=(classifier.HIDDEN_UNITS,), alpha=classifier.L2_WEIGHT,
                        max_iter=classifier.MAX_EPOCHS, random_state=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp.fit(x.reshape(200, -1).astype(np.float32), y)
    probe = rng.random((30, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(classifier.predict_proba(w, probe),
                               mlp.predict_proba(probe.reshape(30, -1)), rtol=1e-4, atol=1e-6)


def test_missing_classes_never_win_and_two_classes_work():
    x = np.zeros((40, 28, 28), np.uint8)
    y = np.array([3, 7] * 20)
    x[y == 3, :14] = 1                       # 3s: top half on; 7s: bottom half on
    x[y == 7, 14:] = 1
    w = classifier.fit(x, y, seed=0)
    proba = classifier.predict_proba(w, x.astype(np.float32))
    assert proba.shape == (40, 10)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert set(np.argmax(proba, 1)) <= {3, 7}
    assert classifier.label_accuracy(proba, y) == 1.0
    assert proba[:, [0, 1, 2, 4, 5, 6, 8, 9]].max() < 1e-6


def test_sample_summary_by_hand():
    proba = np.array([[0.9, 0.1] + [0] * 8, [0.2, 0.8] + [0] * 8, [0.6, 0.4] + [0] * 8])
    s = classifier.sample_summary(proba)
    assert s["n_images"] == 3
    assert s["mean_top_probability"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    assert s["label_histogram"] == [2, 1] + [0] * 8


def test_weights_round_trip_without_pickle_and_bad_files_are_refused(digits, tmp_path):
    w = digits[0]
    path = tmp_path / "clf.npz"
    w.save(path)
    back = classifier.ClassifierWeights.load(path)
    assert back.n_train == 600 and back.test_accuracy == pytest.approx(w.test_accuracy)
    np.testing.assert_array_equal(back.w1_DxU, w.w1_DxU)
    np.savez(tmp_path / "bad.npz", w1_DxU=np.zeros((10, 4)), b1_U=np.zeros(4),
             w2_UxL=np.zeros((4, 10)), b2_L=np.zeros(10), n_train=1, test_accuracy=0.5)
    with pytest.raises(DataError, match="not a 28x28 digit classifier"):
        classifier.ClassifierWeights.load(tmp_path / "bad.npz")
    # Damaged files are one line naming the file, never a zipfile/zlib traceback.
    good = path.read_bytes()
    arrays = dict(np.load(path))
    damaged = {"not a zip": b"PK\x03\x04junk", "truncated": good[: len(good) // 2],
               "zeroed": bytes(len(good))}
    for name, (key, value) in {"nan": ("w1_DxU", np.full_like(w.w1_DxU, np.nan)),
                               "ints": ("b2_L", np.zeros(10, np.int64)),
                               "no w2": ("w2_UxL", None), "1-d": ("w1_DxU", np.zeros(3))}.items():
        edited = {k: v for k, v in {**arrays, key: value}.items() if v is not None}
        np.savez(tmp_path / "edit.npz", **edited)
        damaged[name] = (tmp_path / "edit.npz").read_bytes()
    for name, data in damaged.items():
        (tmp_path / "bad.npz").write_bytes(data)
        with pytest.raises(DataError) as e:
            classifier.ClassifierWeights.load(tmp_path / "bad.npz")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{tmp_path / 'bad.npz'}: ")
        assert "digit classifier" in msg
        assert msg.endswith("rerun `vnca prepare-data`")
    with pytest.raises(ValueError, match="square images"):
        classifier.pixels(np.zeros((2, 20, 20)))
