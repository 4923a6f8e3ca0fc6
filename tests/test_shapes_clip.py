"""The tiny shapes CLIP: the shipped weights load and know the world; the command still works."""

import json

import numpy as np
import pytest
import torch

from mtkd_jax import shapes_clip
from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.clip.model import CLIP
from mtkd_jax.clip.tokenizer import CLIPTokenizer
from mtkd_jax.data import shapes

# Zero-shot floors (%) of the shipped weights on a fresh test split the pretraining never saw;
# chance is 100/18 on base and novel, 100/36 on all. The shipped model's measured numbers are in
# mtkd_jax/data/assets/shapes_clip.json; the floors leave room for a new rendering seed.
SHIPPED_FLOOR = {"base": 55.0, "novel": 55.0, "all": 35.0}


@pytest.fixture(scope="module")
def shipped():
    return shapes_clip.load_shapes_clip()


def test_contrastive_loss_matches_torch_cross_entropy():
    logits = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32) * 3
    targets = torch.arange(6)
    reference = 0.5 * (
        torch.nn.functional.cross_entropy(torch.from_numpy(logits), targets)
        + torch.nn.functional.cross_entropy(torch.from_numpy(logits).T, targets)
    )
    np.testing.assert_allclose(
        float(shapes_clip.contrastive_loss(logits)), float(reference), rtol=1e-6
    )


def test_compact_vocabulary_keeps_order_and_end_of_text_largest():
    tokenizer = CLIPTokenizer()
    ids = tokenizer.tokenize(["a photo of a red star.", "a large blue cross."], context_length=12)
    vocab_ids, compact = shapes_clip.compact_vocabulary(ids)
    np.testing.assert_array_equal(vocab_ids[compact], ids)
    assert np.all(np.diff(vocab_ids) > 0)
    # CLIP pools at argmax(ids): the same position in both numberings.
    np.testing.assert_array_equal(compact.argmax(-1), ids.argmax(-1))
    assert vocab_ids[-1] == tokenizer.eot_token_id


def test_saved_compact_model_loads_into_full_vocabulary_with_same_features(tmp_path):
    tokenizer = CLIPTokenizer()
    ids = tokenizer.tokenize(
        [t.format(name) for t in shapes.TEMPLATES for name in shapes.CLASSNAMES[:5]],
        context_length=shapes_clip.CONTEXT_LENGTH,
    )
    vocab_ids, compact = shapes_clip.compact_vocabulary(ids)
    config = CLIPConfig.preset("tiny", context_length=shapes_clip.CONTEXT_LENGTH)
    model = CLIP(config.replace(vocab_size=len(vocab_ids)))
    path = shapes_clip.save_shapes_clip(model, vocab_ids, tmp_path / "w.npz", dtype="float32")
    loaded = shapes_clip.load_shapes_clip(path=path)
    assert loaded.config.vocab_size == config.vocab_size
    images = shapes_clip.normalise_images(shapes.render_split("val", 3, 0, 32)[0])
    np.testing.assert_allclose(
        np.asarray(loaded.encode_text(ids)), np.asarray(model.encode_text(compact)), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(loaded.encode_image(images)), np.asarray(model.encode_image(images)), atol=1e-5
    )
    table = np.asarray(loaded.text.embedding.token_embedding.embeddings)
    unused = np.setdiff1d(np.arange(config.vocab_size), vocab_ids)
    assert not table[unused].any()


def test_load_with_prompts_keeps_pretrained_weights_and_adds_fresh_prompts(shipped):
    prompted = shapes_clip.load_shapes_clip(prompt_length=2, prompt_depth=3)
    plain = {v.path: np.asarray(v.value) for v in shipped.weights}
    prompts = [v for v in prompted.weights if "prompt" in v.path]
    assert len(prompts) == 2 * 3
    assert all(np.asarray(v.value).std() > 0 for v in prompts)
    for variable in prompted.weights:
        if "prompt" not in variable.path:
            np.testing.assert_array_equal(np.asarray(variable.value), plain[variable.path])


def test_file_that_does_not_match_the_model_raises_listing_names(tmp_path):
    path = tmp_path / "bad.npz"
    with np.load(shapes_clip.ASSET_DIR / shapes_clip.WEIGHTS_FILE) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["weight:visual/extra/kernel"] = arrays.pop("weight:visual/ln_post/gamma")
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="Missing weights: \\['visual/ln_post/gamma'\\]"):
        shapes_clip.load_shapes_clip(path=path)
    with pytest.raises(FileNotFoundError, match="python -m mtkd_jax.shapes_clip"):
        shapes_clip.load_shapes_clip(path=tmp_path / "absent.npz")


def test_shipped_weights_classify_fresh_test_images_zero_shot(shipped):
    accuracy = shapes_clip.evaluate(shipped, None, num_images=15 * len(shapes.CLASSNAMES), seed=7)
    for key, floor in SHIPPED_FLOOR.items():
        assert accuracy[key] >= floor, accuracy


def test_shipped_weights_are_small():
    size = (shapes_clip.ASSET_DIR / shapes_clip.WEIGHTS_FILE).stat().st_size
    assert size < 5 * 2**20


def test_pretraining_command_still_produces_a_model_well_above_chance(tmp_path):
    # A shrunk run of the same command: the "tiny" architecture, 250 steps.
    arguments = ["--out", str(tmp_path), "--preset=tiny", "--steps=250", "--batch_size=64"]
    arguments += ["--learning_rate=0.002"]
    arguments += ["--corpus_size=4000", f"--eval_images={10 * len(shapes.CLASSNAMES)}"]
    report = shapes_clip.main(arguments)
    written = json.loads((tmp_path / shapes_clip.REPORT_FILE).read_text())
    assert written["zero_shot_test_accuracy"] == report["zero_shot_test_accuracy"]
    accuracy = report["zero_shot_test_accuracy"]
    # Chance: 5.6% on base and novel, 2.8% on all.
    assert accuracy["base"] >= 20 and accuracy["novel"] >= 20 and accuracy["all"] >= 10, accuracy
    assert report["final_loss"] < np.log(64) - 1.0


@pytest.mark.slow
def test_default_pretraining_reproduces_the_shipped_accuracy(tmp_path):
    # The full command (about 25 minutes on 2 CPU cores).
    report = shapes_clip.main(["--out", str(tmp_path)])
    shipped_report = json.loads((shapes_clip.ASSET_DIR / shapes_clip.REPORT_FILE).read_text())
    for key in ("base", "novel", "all"):
        expected = shipped_report["zero_shot_test_accuracy"][key]
        assert report["zero_shot_test_accuracy"][key] >= expected - 5
