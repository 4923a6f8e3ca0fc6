"""The Keras CLIP model: configs, real architecture sizes, prompts plumbing, class prompts."""

import subprocess
import sys

import numpy as np
import pytest

import mtkd_jax  # noqa: F401  (sets KERAS_BACKEND)
from mtkd_jax.clip import CLIP, CLIPConfig, class_token_ids, image_encoder_flops
from mtkd_jax.clip.tokenizer import CLIPTokenizer

PROMPTED = dict(
    vision_prompt_length=4, vision_prompt_depth=2, text_prompt_length=4, text_prompt_depth=2
)


def test_config_round_trips_through_keras_config():
    model = CLIP(CLIPConfig.preset("tiny", **PROMPTED))
    clone = CLIP.from_config(model.get_config())
    assert clone.config == model.config
    assert [v.shape for v in clone.weights] == [v.shape for v in model.weights]
    assert CLIPConfig.from_dict(model.config.to_dict()) == model.config


@pytest.mark.parametrize(
    "preset, parameters",
    [("ViT-B/32", 151_277_313), ("ViT-B/16", 149_620_737), ("ViT-L/14", 427_616_513)],
)
def test_presets_have_openai_parameter_counts(preset, parameters):
    """OpenAI's published models' parameter counts (sum of numel over `model.parameters()`),
    computed from the shapes without building the model."""
    config = CLIPConfig.preset(preset)
    width, layers = config.vision_width, config.vision_layers
    block = lambda w: 12 * w * w + 13 * w  # attention (4w²+4w) + MLP (8w²+5w) + 2 LayerNorms
    vision = (
        3 * config.patch_size**2 * width
        + width
        + (config.num_patches + 1) * width
        + 4 * width
        + layers * block(width)
        + width * config.embed_dim
    )
    text = (
        config.vocab_size * config.text_width
        + config.context_length * config.text_width
        + config.text_layers * block(config.text_width)
        + 2 * config.text_width
        + config.text_width * config.embed_dim
    )
    assert vision + text + 1 == parameters


def test_built_model_matches_counted_parameters():
    config = CLIPConfig.preset("tiny")
    model = CLIP(config)
    counted = sum(int(np.prod(v.shape)) for v in model.weights)
    width = config.vision_width
    block = 12 * width * width + 13 * width
    expected = (
        3 * 64 * width + width + 17 * width + 4 * width + 2 * block + width * 32
        + 49408 * 32 + 77 * 32 + 2 * block + 2 * 32 + 32 * 32 + 1
    )  # fmt: skip
    assert counted == expected


def test_outputs_have_expected_shapes_and_logits_are_scaled_cosines():
    model = CLIP(CLIPConfig.preset("tiny", **PROMPTED))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = class_token_ids(["cat", "dog", "traffic_light"], CLIPTokenizer(), model.config)
    out = model({"images": images, "token_ids": ids})
    assert out["image_features"].shape == (2, 32)
    assert out["text_features"].shape == (3, 32)
    image = np.array(out["image_features"])
    text = np.array(out["text_features"])
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out["logits"]), (1 / 0.07) * image @ text.T, rtol=1e-4)


def test_freeze_encoders_leaves_only_prompts_trainable():
    model = CLIP(CLIPConfig.preset("tiny", **PROMPTED)).freeze_encoders()
    paths = [v.path for v in model.trainable_variables]
    assert len(paths) == 4 and all("prompt" in p for p in paths)
    assert len(model.prompt_variables()) == 4


def test_class_token_ids_put_placeholders_where_the_context_goes():
    tokenizer = CLIPTokenizer()
    prompted = class_token_ids(
        ["golden_retriever"], tokenizer, CLIPConfig.preset("tiny", **PROMPTED)
    )
    plain = class_token_ids(["golden_retriever"], tokenizer, CLIPConfig.preset("tiny"))
    x = tokenizer.encode("X")
    assert prompted[0, 0] == tokenizer.sot_token_id
    assert list(prompted[0, 1:5]) == x * 4
    assert list(prompted[0, 5:8]) == tokenizer.encode("golden retriever.")
    assert prompted[0, 8] == tokenizer.eot_token_id
    expected = tokenizer.tokenize(["a photo of a golden retriever."])
    np.testing.assert_array_equal(plain, expected)


def test_text_prompt_positions_ignore_the_placeholder_ids():
    model = CLIP(CLIPConfig.preset("tiny", **PROMPTED))
    ids = class_token_ids(["cat"], CLIPTokenizer(), model.config)
    other = ids.copy()
    other[:, 1:5] = 7  # different placeholders, same context vectors
    np.testing.assert_allclose(model.encode_text(ids), model.encode_text(other), atol=1e-6)


def test_image_encoder_flops_matches_xla_count():
    from mtkd_jax.student import measured_flops

    config = CLIPConfig.preset("tiny", vision_prompt_length=4, vision_prompt_depth=2)
    model = CLIP(config)
    measured = measured_flops(model.visual, (32, 32, 3))
    # XLA also counts LayerNorm, softmax and activations: a few percent on top of the matmuls.
    assert 1.0 <= measured / image_encoder_flops(config) < 1.15


def test_invalid_config_says_what_was_received():
    with pytest.raises(ValueError, match="vision_prompt_depth=20"):
        CLIPConfig.preset("tiny", vision_prompt_length=4, vision_prompt_depth=20)
    with pytest.raises(ValueError, match="Valid names"):
        CLIPConfig.preset("ViT-H/14")


def test_flash_attention_fallback_tracebacks_become_one_warning(caplog):
    import logging

    from absl import logging as absl_logging

    import mtkd_jax.clip.model  # noqa: F401  (installs the filter)
    from mtkd_jax.clip import attention_log

    absl_filters = logging.getLogger("absl").filters
    assert any(isinstance(f, attention_log.FlashFallbackFilter) for f in absl_filters)
    installed = attention_log.install()
    assert attention_log.install() is installed  # once per process
    installed.dropped = 0
    with caplog.at_level(logging.INFO):
        for _ in range(3):  # what Keras does for each attention block it traces
            try:
                raise NotImplementedError("Unsupported sequence length Q 201, KV 201.")
            except NotImplementedError:
                absl_logging.exception(
                    "Failed to apply cudnn implementation of jax.nn.dot_product_attention."
                )
        absl_logging.error("an unrelated error")
    messages = [record.getMessage() for record in caplog.records]
    assert not any(m.startswith("Failed to apply cudnn") for m in messages)
    warnings = [m for m in messages if "refused some attention shapes" in m]
    assert len(warnings) == 1 and "Q 201" in warnings[0]
    assert "an unrelated error" in messages


def test_clip_config_tokenizer_and_loaders_import_no_keras():
    """Reasoning about a checkpoint (config, tokenizer, loader functions) needs no Keras; the
    model is imported on first use."""
    script = (
        "import sys\n"
        "import mtkd_jax.clip.config, mtkd_jax.clip.tokenizer\n"
        "from mtkd_jax.clip import CLIPConfig, load, save\n"
        "assert callable(load) and callable(save), (load, save)\n"
        "loaded = sorted({'keras', 'keras_hub', 'tensorflow'} & set(sys.modules))\n"
        "assert not loaded, loaded\n"
        "from mtkd_jax.clip import CLIP\n"
        "assert 'keras' in sys.modules and CLIP.__module__ == 'mtkd_jax.clip.model'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
