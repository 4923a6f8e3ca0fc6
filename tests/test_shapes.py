"""The shapes world's renderer: deterministic, balanced, and every class drawn as named."""

import numpy as np
import pytest

from mtkd_jax.data import shapes


def test_world_has_at_least_six_shapes_and_six_colours_as_classes():
    assert len(shapes.SHAPES) >= 6 and len(shapes.COLOURS) >= 6
    expected = {f"{c} {s}" for s in shapes.SHAPES for c in shapes.COLOURS}
    assert set(shapes.CLASSNAMES) == expected
    assert len(shapes.CLASSNAMES) == len(expected)
    assert shapes.TEMPLATES == ["a photo of a {}."]


def test_base_and_novel_halves_each_cover_every_shape_and_colour():
    half = (len(shapes.CLASSNAMES) + 1) // 2
    for names in (shapes.CLASSNAMES[:half], shapes.CLASSNAMES[half:]):
        colours = {name.split(" ")[0] for name in names}
        kinds = {name.split(" ")[1] for name in names}
        assert colours == set(shapes.COLOURS)
        assert kinds == set(shapes.SHAPES)


def test_same_arguments_render_identical_bytes():
    first = shapes.render_split("train", 20, seed=3, image_size=32)
    second = shapes.render_split("train", 20, seed=3, image_size=32)
    assert first[0].tobytes() == second[0].tobytes()
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]


@pytest.mark.parametrize(
    "other",
    [("train", 4), ("test", 3), ("val", 3)],
    ids=["other_seed", "other_split", "another_split"],
)
def test_other_seed_or_split_renders_other_images(other):
    reference, _, _ = shapes.render_split("train", 20, seed=3)
    images, _, _ = shapes.render_split(other[0], 20, seed=other[1])
    # No image of one stream appears in the other.
    flat_reference = {image.tobytes() for image in reference}
    assert not flat_reference & {image.tobytes() for image in images}


def test_caption_corpus_is_its_own_stream_over_all_classes():
    images, labels, captions = shapes.render_caption_corpus(72, seed=0, image_size=32)
    split_images, _, _ = shapes.render_split("train", 72, seed=0, image_size=32)
    assert not {i.tobytes() for i in images} & {i.tobytes() for i in split_images}
    assert set(labels.tolist()) == set(range(len(shapes.CLASSNAMES)))
    for label, caption in zip(labels, captions, strict=True):
        colour, kind = shapes.CLASSNAMES[label].split(" ")
        assert f" {colour} {kind}" in caption
    # Several phrasings, with and without the size word.
    assert len({caption.split(" ")[1] for caption in captions}) > 1
    assert any(not any(size in c for size in shapes.SIZES) for c in captions)


def test_split_shapes_dtypes_and_value_ranges():
    images, labels, captions = shapes.render_split("val", 50, seed=0, image_size=24)
    assert images.shape == (50, 24, 24, 3) and images.dtype == np.uint8
    assert labels.shape == (50,) and labels.dtype == np.int32
    assert len(captions) == 50
    assert labels.min() >= 0 and labels.max() < len(shapes.CLASSNAMES)
    # Images use the range, not a constant: background, shape and noise.
    assert images.min() < 60 and images.max() > 200
    assert all(image.std() > 5 for image in images)


def test_labels_are_balanced_and_cover_all_classes():
    num_classes = len(shapes.CLASSNAMES)
    _, labels, _ = shapes.render_split("test", 3 * num_classes + 5, seed=1, image_size=16)
    counts = np.bincount(labels, minlength=num_classes)
    assert counts.max() - counts.min() <= 1
    assert counts.min() == 3
    # Shuffled, not in label order.
    assert not np.all(np.diff(labels) >= 0)


def test_captions_name_the_rendered_class_and_size():
    _, labels, captions = shapes.render_split("train", 40, seed=0, image_size=32)
    for label, caption in zip(labels, captions, strict=True):
        words = caption.rstrip(".").split(" ")
        assert words[:4] == ["a", "photo", "of", "a"]
        assert words[4] in shapes.SIZES
        assert " ".join(words[5:]) == shapes.CLASSNAMES[label]


def test_every_class_is_drawn_in_its_colour():
    num_classes = len(shapes.CLASSNAMES)
    images, labels, _ = shapes.render_split("test", 2 * num_classes, seed=2, image_size=32)
    palette = np.array([shapes.COLOUR_RGB[c] for c in shapes.COLOURS], np.float32)
    for image, label in zip(images, labels, strict=True):
        colour = shapes.CLASSNAMES[label].split(" ")[0]
        pixels = image.reshape(-1, 3).astype(np.float32)
        distance = np.linalg.norm(pixels[:, None, :] - palette[None, :, :], axis=-1)
        nearest = distance.argmin(-1)
        close = distance.min(-1) < 55
        # The object covers at least 1% of the image in (nearly) its nominal colour, and
        # more of the image than any other colour does (distractors are faint).
        counts = np.bincount(nearest[close], minlength=len(shapes.COLOURS))
        assert counts[shapes.COLOURS.index(colour)] >= 0.01 * len(pixels), (label, counts)
        assert counts.argmax() == shapes.COLOURS.index(colour), (label, counts)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="Received: split='training'"):
        shapes.render_split("training", 4, seed=0)
    with pytest.raises(ValueError, match="Received: image_size=4"):
        shapes.render_split("train", 4, seed=0, image_size=4)
    with pytest.raises(ValueError, match="Received: num_images=-1"):
        shapes.render_split("train", -1, seed=0)
