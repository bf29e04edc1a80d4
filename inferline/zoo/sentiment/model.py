"""The sentiment classifier: Keras Embedding (padding masked) + LSTM + sigmoid, giving P(positive)."""

from __future__ import annotations

from typing import Any


def build_classifier(vocab_size: int, max_len: int, quick: bool = False) -> Any:
    """An uncompiled keras.Model mapping int32 token ids [B, max_len] (0 = padding) to P(positive) [B, 1].

    mask_zero makes the LSTM skip the padding, so a text's score does not depend on how much padding it got."""
    import keras
    from keras import layers

    dim, units = (16, 16) if quick else (64, 64)
    inputs = keras.Input(shape=(max_len,), dtype="int32", name="tokens")
    x = layers.Embedding(vocab_size, dim, mask_zero=True, name="embedding")(inputs)
    x = layers.LSTM(units, name="lstm")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="positive")(x)
    return keras.Model(inputs, outputs, name="sentiment")
