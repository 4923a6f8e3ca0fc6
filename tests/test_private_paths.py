"""The two private paths mtkd_jax relies on, pinned: if a Keras or keras-hub release moves or
changes them, these fail with a message saying what to update (rather than a loader or the
model failing somewhere deep inside a user's run).

- `keras_hub.src.models.clip.clip_layers.CLIPEncoderLayer`: the CLIP transformer block
  (`mtkd_jax.clip.model`); keras-hub exports no public CLIP block.
- `keras.src.backend.common.global_state`'s "uninitialized_variables": the list a model built
  under `keras.StatelessScope(initialize_variables=False)` is put on, which
  `mtkd_jax.clip.porting.forget_pending` trims after loading every weight.
"""

import inspect

import numpy as np

import mtkd_jax  # noqa: F401  (sets KERAS_BACKEND)

MOVED = "moved or changed in this release; update {where} (and this test)."


def test_keras_hub_clip_block_has_the_arguments_and_sub_layers_we_map():
    try:
        from keras_hub.src.models.clip.clip_layers import CLIPEncoderLayer
    except ImportError as error:
        raise AssertionError(
            "keras-hub's CLIPEncoderLayer " + MOVED.format(where="mtkd_jax/clip/model.py")
        ) from error
    parameters = list(inspect.signature(CLIPEncoderLayer.__init__).parameters)
    assert parameters[1:6] == [
        "hidden_dim",
        "num_heads",
        "intermediate_dim",
        "intermediate_activation",
        "use_causal_mask",
    ], "CLIPEncoderLayer's arguments " + MOVED.format(where="mtkd_jax/clip/model.py")
    block = CLIPEncoderLayer(8, 2, 24, "quick_gelu", use_causal_mask=False, name="block_0")
    x = np.random.default_rng(0).normal(size=(1, 3, 8)).astype("float32")
    block.build(x.shape)
    names = ("layer_norm_1", "attention", "layer_norm_2", "dense_1", "dense_2")
    assert all(hasattr(block, name) for name in names), (
        "CLIPEncoderLayer's sub-layers "
        + MOVED.format(where="the tables in mtkd_jax/clip/convert_*.py")
    )
    assert block.dense_1.kernel.shape == (8, 24)
    before = np.asarray(block(x))
    block.layer_norm_1.epsilon = block.layer_norm_2.epsilon = 10.0  # set as model.py sets it
    assert not np.allclose(np.asarray(block(x)), before), (
        "CLIPEncoderLayer no longer reads its LayerNorms' epsilon at call time "
        + MOVED.format(where="_encoder_layers in mtkd_jax/clip/model.py")
    )


def test_forget_pending_removes_a_loaded_model_from_keras_deferred_variables():
    import keras

    from mtkd_jax.clip.porting import build_uninitialised, forget_pending

    try:
        from keras.src.backend.common import global_state
    except ImportError as error:
        raise AssertionError(
            "Keras's global_state "
            + MOVED.format(where="forget_pending in mtkd_jax/clip/porting.py")
        ) from error
    model = build_uninitialised(
        lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    )
    pending = global_state.get_global_attribute("uninitialized_variables") or []
    ours = {id(v) for v in model.weights}
    assert ours <= {id(v) for v in pending}, (
        "Keras no longer lists deferred variables under 'uninitialized_variables' "
        + MOVED.format(where="forget_pending in mtkd_jax/clip/porting.py")
    )
    for variable in model.weights:
        variable.assign(np.ones(variable.shape, "float32"))
    forget_pending(model)
    remaining = global_state.get_global_attribute("uninitialized_variables") or []
    assert not ours & {id(v) for v in remaining}
    np.testing.assert_allclose(np.asarray(model(np.ones((1, 3), "float32"))), [[4.0, 4.0]])
