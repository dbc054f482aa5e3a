"""The Keras/TensorFlow MNIST tutorial, as its users run it: the peer that `cnnkit bench`
compares with. Needs only TensorFlow and numpy; reads the official MNIST files from
$CNNKIT_DATA/mnist. Prints one JSON line.

    python bench_keras.py [--epochs 5] [--seed 0]
"""

import argparse
import gzip
import json
import os
import time

import numpy as np


def read_idx(path):
    with gzip.open(path) as f:
        data = f.read()
    if data[2:4] == b"\x08\x03":
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28, 1)
    return np.frombuffer(data, np.uint8, offset=8)


def mnist():
    for root in os.environ.get("CNNKIT_DATA", "").split(os.pathsep):
        d = os.path.join(root, "mnist")
        if root and os.path.exists(os.path.join(d, "t10k-labels-idx1-ubyte.gz")):
            return [
                read_idx(os.path.join(d, f"{s}-{k}-idx{n}-ubyte.gz"))
                for s in ("train", "t10k")
                for k, n in (("images", 3), ("labels", 1))
            ]
    raise SystemExit("set CNNKIT_DATA to a directory holding mnist/")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import tensorflow as tf
    from tensorflow import keras

    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = mnist()
    x_train, x_test = x_train.astype("float32") / 255, x_test.astype("float32") / 255
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    class EpochTimer(keras.callbacks.Callback):
        """Training seconds per epoch, without the validation pass (as cnnkit counts)."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0, self.validating = time.perf_counter(), 0.0

        def on_test_begin(self, logs=None):
            self.v0 = time.perf_counter()

        def on_test_end(self, logs=None):
            self.validating += time.perf_counter() - self.v0

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.t0 - self.validating)

    seconds = []
    model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=0,
        callbacks=[EpochTimer()],
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    n = int(len(x_train) * 0.9)
    print(
        json.dumps(
            {
                "benchmark": "keras",
                "tensorflow": tf.__version__,
                "seed": args.seed,
                "epochs": args.epochs,
                "batch_size": 32,
                "train_seconds": round(sum(seconds), 2),
                "seconds_per_epoch": [round(s, 2) for s in seconds],
                "images_per_s": round(n * args.epochs / sum(seconds)),
                "test_accuracy": float(accuracy),
            }
        )
    )


if __name__ == "__main__":
    main()
