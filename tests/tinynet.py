"""A tiny registered backbone for tests (and an example of registering your own).

Importing this module registers ``tiny_cnn``; recipes and the CLI pick it up through
``STACKER_PLUGINS=tinynet``. Its layers are named ``block<i>_...`` so that fine-tuning
can unfreeze whole blocks (``block_pattern``).
"""

from stacker.backbones import BackboneCfg, register_backbone


def build_tiny_cnn(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", classes=1000):
    """A two-block network with the keras.applications signature."""
    import keras
    from keras import layers

    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((8, 16), start=1):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"block{i}_conv")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x) if pooling == "avg" or include_top else x
    if include_top:
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name="tiny_cnn_net")
    if weights is not None:
        model.load_weights(weights)
    return model


register_backbone(BackboneCfg("tiny_cnn", "tinynet:build_tiny_cnn", 32, "tf", 16, block_pattern=r"^(block\d+)_"),
                  overwrite=True)
# A second name for the same network at another default size: a test can stack two backbones.
register_backbone(BackboneCfg("tiny_cnn_b", "tinynet:build_tiny_cnn", 24, "tf", 16, block_pattern=r"^(block\d+)_"),
                  overwrite=True)
