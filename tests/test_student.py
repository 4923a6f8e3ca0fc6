"""The student: frozen parts, stages, adapter formula, projector, light backbones."""

import jax
import keras
import numpy as np
import pytest

import mtkd_jax  # noqa: F401  (sets KERAS_BACKEND)
from mtkd_jax.clip import CLIP, CLIPConfig, image_encoder_flops
from mtkd_jax.student import (
    ResidualAdapter,
    Student,
    backbone_student,
    clip_student,
)

IMAGES = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def teacher():
    return CLIP(CLIPConfig.preset("tiny"))


def test_clip_student_trains_only_prompts_and_projector(teacher):
    student = clip_student(teacher, 48, prompt_length=2, prompt_depth=2)
    trainable = [v.path for v in student.trainable_variables]
    assert all("prompt" in p or p.startswith("projector/") for p in trainable)
    assert sum("prompt" in p for p in trainable) == 2
    frozen = {v.path for v in student.encoder.non_trainable_variables}
    assert "encoder/block_0/attention/query/kernel" in frozen
    # The frozen encoder carries the teacher's weights.
    np.testing.assert_array_equal(
        np.asarray(student.encoder.blocks[1].dense_2.kernel),
        np.asarray(teacher.visual.blocks[1].dense_2.kernel),
    )
    assert student(IMAGES).shape == (4, 48)


def test_adapter_stage_trains_only_the_adapter_and_same_variables(teacher):
    student = clip_student(teacher, 48, prompt_length=2, prompt_depth=2)
    before = [v.path for v in student.weights]
    student.start_adapter_stage()
    assert [v.path for v in student.weights] == before
    assert {v.path for v in student.trainable_variables} == {
        "adapter/down/kernel",
        "adapter/up/kernel",
    }


def test_adapter_equals_formula():
    adapter = ResidualAdapter(reduction=4, ratio=0.2)
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    out = np.asarray(adapter(x))
    w1, w2 = np.asarray(adapter.down.kernel), np.asarray(adapter.up.kernel)
    assert w1.shape == (16, 4) and w2.shape == (4, 16)
    relu = lambda z: np.maximum(z, 0)
    np.testing.assert_allclose(out, 0.2 * relu(relu(x @ w1) @ w2) + 0.8 * x, rtol=1e-5, atol=1e-6)


def test_stage2_output_is_adapter_of_stage1_output(teacher):
    student = clip_student(teacher, 48, prompt_length=2, prompt_depth=2)
    stage1 = np.asarray(student(IMAGES, training=False))
    student.start_adapter_stage()
    stage2 = np.asarray(student(IMAGES, training=True))  # frozen BatchNorm: inference statistics
    np.testing.assert_allclose(stage2, np.asarray(student.adapter(stage1)), rtol=1e-5, atol=1e-5)


def test_projector_matches_numpy_in_inference():
    student = clip_student(CLIPConfig.preset("tiny"), 48, prompt_length=0, prompt_depth=0)
    features = np.asarray(student.encoder(IMAGES))
    p = student.projector
    norm = p.norm
    h = features @ np.asarray(p.dense_in.kernel)
    h = (h - np.asarray(norm.moving_mean)) / np.sqrt(np.asarray(norm.moving_variance) + 1e-5)
    h = np.maximum(h * np.asarray(norm.gamma) + np.asarray(norm.beta), 0)
    expected = h @ np.asarray(p.dense_out.kernel)
    np.testing.assert_allclose(np.asarray(student(IMAGES)), expected, rtol=1e-4, atol=1e-5)


def test_stateless_call_under_jit_updates_batchnorm_statistics(teacher):
    student = clip_student(teacher, 48, prompt_length=2, prompt_depth=2)
    trainable = [v.value for v in student.trainable_variables]
    non_trainable = [v.value for v in student.non_trainable_variables]

    @jax.jit
    def step(trainable, non_trainable, images):
        return student.stateless_call(trainable, non_trainable, images, training=True)

    features, updated = step(trainable, non_trainable, IMAGES)
    assert features.shape == (4, 48)
    names = [v.path for v in student.non_trainable_variables]
    moved = names.index("projector/norm/moving_mean")
    assert not np.allclose(updated[moved], non_trainable[moved])


def test_student_config_round_trips(teacher):
    student = clip_student(teacher, 48, prompt_length=2, prompt_depth=2, use_adapter=True)
    clone = Student.from_config(student.get_config())
    assert clone.use_adapter and [v.path for v in clone.weights] == [
        v.path for v in student.weights
    ]
    assert [v.path for v in clone.trainable_variables] == [
        v.path for v in student.trainable_variables
    ]


def test_backbone_student_pools_a_keras_hub_backbone():
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(32, 32, 3),
    )  # fmt: skip
    student = backbone_student(backbone, 48)
    assert student.encoder_dim == 16
    assert student(IMAGES).shape == (4, 48)
    encoder_trainable = [v for v in student.encoder.trainable_variables]
    assert encoder_trainable  # the light backbone trains whole in stage 1
    clone = Student.from_config(student.get_config())
    assert clone(IMAGES).shape == (4, 48)
    with pytest.raises(ValueError, match="Received"):
        backbone_student(keras.layers.Dense(3), 48)


def test_tiny_student_has_five_times_fewer_flops_than_tiny_teacher():
    teacher = image_encoder_flops(CLIPConfig.preset("tiny-teacher", vision_prompt_length=4,
                                                    vision_prompt_depth=4))  # fmt: skip
    student = image_encoder_flops(CLIPConfig.preset("tiny-student", vision_prompt_length=4,
                                                    vision_prompt_depth=2))  # fmt: skip
    assert teacher >= 5 * student
