"""The multi-level KD losses against an independent numpy implementation and their properties."""

import doctest
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mtkd_jax import losses
from mtkd_jax.losses import batch_kd, class_kd, instance_kd, multilevel_kd

LEVELS = {"instance": instance_kd, "batch": batch_kd, "class": class_kd}


# ---------------------------------------------------------------- independent numpy reference
def _np_softmax(z, t):
    z = np.asarray(z, np.float64) / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_instance(zs, zt, t):
    ps, pt = _np_softmax(zs, t), _np_softmax(zt, t)
    kl = np.array([sum(pt[i, c] * np.log(pt[i, c] / ps[i, c]) for c in range(pt.shape[1]))
                   for i in range(pt.shape[0])])  # fmt: skip
    return t * t * kl.mean()


def np_batch(zs, zt, t):
    ps, pt = _np_softmax(zs, t), _np_softmax(zt, t)
    b = ps.shape[0]
    gs = np.einsum("ic,jc->ij", ps, ps)
    gt = np.einsum("ic,jc->ij", pt, pt)
    return ((gt - gs) ** 2).sum() / b


def np_class(zs, zt, t):
    ps, pt = _np_softmax(zs, t), _np_softmax(zt, t)
    c = ps.shape[1]
    gs = np.einsum("ia,ib->ab", ps, ps)
    gt = np.einsum("ia,ib->ab", pt, pt)
    return ((gt - gs) ** 2).sum() / c


NP_LEVELS = {"instance": np_instance, "batch": np_batch, "class": np_class}


def _logits(seed, batch, classes, scale=3.0):
    rng = np.random.default_rng(seed)
    return (
        (rng.normal(size=(batch, classes)) * scale).astype(np.float32),
        (rng.normal(size=(batch, classes)) * scale).astype(np.float32),
    )


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("batch,classes", [(1, 2), (8, 5), (16, 37), (5, 102)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 6.0])
def test_each_level_matches_numpy_reference(level, batch, classes, temperature):
    zs, zt = _logits(batch * 1000 + classes, batch, classes)
    got = jax.jit(lambda a, b: LEVELS[level](a, b, temperature=temperature))(zs, zt)
    want = NP_LEVELS[level](zs, zt, temperature)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)


def test_multilevel_sums_weighted_levels_over_temperatures():
    zs, zt = _logits(0, 8, 10)
    temps, weights = (1.0, 2.0, 3.0, 5.0, 6.0), (1.0, 0.5, 2.0)
    loss, parts = jax.jit(lambda a, b: multilevel_kd(a, b, temperatures=temps, weights=weights))(
        zs, zt
    )
    want_parts = {k: sum(f(zs, zt, t) for t in temps) for k, f in NP_LEVELS.items()}
    for k in want_parts:
        np.testing.assert_allclose(float(parts[k]), want_parts[k], rtol=1e-5)
    want = sum(
        w * want_parts[k] for w, k in zip(weights, ("instance", "batch", "class"), strict=True)
    )
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_multilevel_defaults_are_the_papers():
    zs, zt = _logits(1, 4, 6)
    loss, _ = multilevel_kd(zs, zt)
    want = sum(f(zs, zt, t) for f in NP_LEVELS.values() for t in (1, 2, 3, 5, 6))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_instance_only_weights_give_the_promptkd_loss():
    zs, zt = _logits(2, 6, 7)
    loss, _ = multilevel_kd(zs, zt, temperatures=(1.0,), weights=(1.0, 0.0, 0.0))
    np.testing.assert_allclose(float(loss), np_instance(zs, zt, 1.0), rtol=1e-5)


def test_instance_level_is_scaled_by_temperature_squared():
    zs, zt = _logits(3, 8, 5)
    t = 4.0
    ps, pt = _np_softmax(zs, t), _np_softmax(zt, t)
    plain_kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
    np.testing.assert_allclose(float(instance_kd(zs, zt, temperature=t)), 16 * plain_kl, rtol=1e-5)


# ---------------------------------------------------------------- closed-form properties
@pytest.mark.parametrize("level", LEVELS)
def test_identical_student_and_teacher_give_zero(level):
    z, _ = _logits(4, 8, 9)
    assert abs(float(LEVELS[level](z, z, temperature=2.0))) < 1e-7


@pytest.mark.parametrize("level", LEVELS)
def test_different_student_and_teacher_give_positive_loss(level):
    zs, zt = _logits(5, 8, 9)
    assert float(LEVELS[level](zs, zt)) > 1e-4


@pytest.mark.parametrize("level", LEVELS)
def test_permuting_rows_leaves_loss_unchanged(level):
    zs, zt = _logits(6, 12, 7)
    perm = np.random.default_rng(0).permutation(12)
    a = LEVELS[level](zs, zt, temperature=2.0)
    b = LEVELS[level](zs[perm], zt[perm], temperature=2.0)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
def test_permuting_classes_leaves_loss_unchanged(level):
    zs, zt = _logits(7, 12, 7)
    perm = np.random.default_rng(1).permutation(7)
    a = LEVELS[level](zs, zt, temperature=2.0)
    b = LEVELS[level](zs[:, perm], zt[:, perm], temperature=2.0)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
def test_teacher_gets_exactly_zero_gradient(level):
    zs, zt = _logits(8, 6, 5)
    grad_t = jax.grad(lambda t: LEVELS[level](zs, t, temperature=2.0))(zt)
    assert np.array_equal(np.asarray(grad_t), np.zeros_like(zt))
    grad_s = jax.grad(lambda s: LEVELS[level](s, zt, temperature=2.0))(zs)
    assert np.abs(np.asarray(grad_s)).max() > 0


@pytest.mark.parametrize("level", LEVELS)
def test_student_gradient_matches_finite_differences(level):
    zs, zt = _logits(9, 5, 4, scale=1.0)
    with jax.enable_x64(True):
        zs64, zt64 = jnp.asarray(zs, jnp.float64), jnp.asarray(zt, jnp.float64)
        fn = lambda s: LEVELS[level](s, zt64, temperature=1.5)  # noqa: E731
        assert fn(zs64).dtype == jnp.float64
        check_grads(fn, (zs64,), order=2, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


def test_multilevel_gradient_matches_finite_differences():
    zs, zt = _logits(10, 6, 5, scale=1.0)
    with jax.enable_x64(True):
        zt64 = jnp.asarray(zt, jnp.float64)
        fn = lambda s: multilevel_kd(s, zt64)[0]  # noqa: E731
        check_grads(fn, (jnp.asarray(zs, jnp.float64),), order=1, modes=["rev"], eps=1e-4)


def test_jit_grad_and_vmap_compose():
    groups = 3
    zs = np.stack([_logits(20 + g, 4, 6)[0] for g in range(groups)])
    zt = np.stack([_logits(20 + g, 4, 6)[1] for g in range(groups)])
    per_group = jax.jit(jax.vmap(lambda s, t: multilevel_kd(s, t)[0]))(zs, zt)
    grads = jax.jit(jax.vmap(jax.grad(lambda s, t: multilevel_kd(s, t)[0])))(zs, zt)
    assert per_group.shape == (groups,) and grads.shape == zs.shape
    for g in range(groups):
        want = sum(f(zs[g], zt[g], t) for f in NP_LEVELS.values() for t in (1, 2, 3, 5, 6))
        np.testing.assert_allclose(float(per_group[g]), want, rtol=1e-5)
        single = jax.grad(lambda s, g=g: multilevel_kd(s, zt[g])[0])(zs[g])
        np.testing.assert_allclose(np.asarray(grads[g]), np.asarray(single), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("level", LEVELS)
def test_bfloat16_inputs_are_computed_in_float32(level):
    zs, zt = _logits(11, 8, 10)
    zs16, zt16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
    got = LEVELS[level](zs16, zt16, temperature=2.0)
    assert got.dtype == jnp.float32
    want = NP_LEVELS[level](np.asarray(zs16, np.float32), np.asarray(zt16, np.float32), 2.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    grad = jax.grad(lambda s: LEVELS[level](s, zt16, temperature=2.0))(zs16)
    assert grad.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad, np.float32)).all()


@pytest.mark.parametrize("level", LEVELS)
def test_extreme_logits_and_small_temperature_stay_finite(level):
    rng = np.random.default_rng(12)
    zs = rng.choice([-1e4, 1e4], size=(6, 5)).astype(np.float32)
    zt = rng.choice([-1e4, 1e4], size=(6, 5)).astype(np.float32)
    value, grad = jax.value_and_grad(lambda s: LEVELS[level](s, zt, temperature=0.05))(zs)
    assert np.isfinite(float(value))
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("level", [*LEVELS, "multilevel"])
def test_masked_rows_do_not_change_the_loss(level):
    zs, zt = _logits(13, 5, 6)
    rng = np.random.default_rng(3)
    pad_s = np.concatenate([zs, rng.normal(size=(3, 6)).astype(np.float32) * 50])
    pad_t = np.concatenate([zt, rng.normal(size=(3, 6)).astype(np.float32) * 50])
    where = np.array([True] * 5 + [False] * 3)
    if level == "multilevel":
        fn = lambda s, t, w=None: multilevel_kd(s, t, where=w)[0]  # noqa: E731
    else:
        fn = lambda s, t, w=None: LEVELS[level](s, t, temperature=2.0, where=w)  # noqa: E731
    np.testing.assert_allclose(float(fn(pad_s, pad_t, where)), float(fn(zs, zt)), rtol=1e-6)
    g_pad = jax.grad(fn)(pad_s, pad_t, where)
    g = jax.grad(fn)(zs, zt)
    np.testing.assert_allclose(np.asarray(g_pad[:5]), np.asarray(g), rtol=1e-5, atol=1e-8)
    assert np.array_equal(np.asarray(g_pad[5:]), np.zeros((3, 6), np.float32))


def test_an_all_padding_batch_gives_zero_not_nan():
    zs, zt = _logits(14, 4, 3)
    for fn in LEVELS.values():
        assert float(fn(zs, zt, where=np.zeros(4, bool))) == 0.0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("level", LEVELS)
def test_mismatched_shapes_raise_a_clear_error(level):
    with pytest.raises(ValueError, match=r"same shape.*\(4, 5\).*\(4, 6\)"):
        LEVELS[level](np.zeros((4, 5), np.float32), np.zeros((4, 6), np.float32))


@pytest.mark.parametrize("level", LEVELS)
def test_integer_logits_raise_a_clear_error(level):
    with pytest.raises(TypeError, match="floating-point.*int32"):
        LEVELS[level](np.zeros((4, 5), np.int32), np.zeros((4, 5), np.float32))


def test_wrong_rank_where_and_temperature_raise_clear_errors():
    z = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match=r"\[batch, classes\].*\(5,\)"):
        instance_kd(z[0], z[0])
    with pytest.raises(ValueError, match=r"where.*batch=4.*\(3,\)"):
        batch_kd(z, z, where=np.ones(3, bool))
    with pytest.raises(ValueError, match="temperature must be positive.*0.0"):
        class_kd(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="weights must be"):
        multilevel_kd(z, z, weights=(1.0, 1.0))


# ---------------------------------------------------------------- docs and hygiene
def test_docstring_examples_run():
    result = doctest.testmod(losses, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


def _run_python(code, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_importing_losses_imports_neither_keras_nor_tensorflow():
    proc = _run_python(
        """
        import sys
        import mtkd_jax.losses
        loaded = {"keras", "tensorflow"} & set(sys.modules)
        assert not loaded, loaded
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_sharded_global_batch_equals_single_device():
    """On 8 devices the relation losses must see the global batch, not 8 per-device ones."""
    proc = _run_python(
        """
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from mtkd_jax.losses import multilevel_kd
        assert jax.device_count() == 8, jax.devices()
        rng = np.random.default_rng(0)
        zs = rng.normal(size=(16, 10)).astype(np.float32) * 3
        zt = rng.normal(size=(16, 10)).astype(np.float32) * 3
        where = np.arange(16) < 13
        fn = lambda s, t, w: multilevel_kd(s, t, where=w)[0]
        value_and_grad = jax.jit(jax.value_and_grad(fn))
        cpu0 = jax.devices()[0]
        single = value_and_grad(*(jax.device_put(x, cpu0) for x in (zs, zt, where)))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        rows = NamedSharding(mesh, P("data"))
        sharded_in = [jax.device_put(x, rows) for x in (zs, zt, where)]
        assert len(sharded_in[0].sharding.device_set) == 8
        sharded = value_and_grad(*sharded_in)
        np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-6)
        # Gradients to 1e-6 of their scale (float32 sums in another order differ in the last
        # bits of the smallest entries).
        scale = float(np.abs(np.asarray(single[1])).max())
        np.testing.assert_allclose(np.asarray(sharded[1]), np.asarray(single[1]),
                                   rtol=1e-6, atol=1e-6 * scale)
        # The per-device computation that a naive pmap would do is a different number.
        per_device = np.mean([float(fn(zs[i:i+2], zt[i:i+2], where[i:i+2]))
                              for i in range(0, 16, 2)])
        assert abs(per_device - float(single[0])) > 1e-3 * abs(float(single[0]))
        print("ok")
        """,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


@pytest.mark.parametrize("level", ["batch", "class"])
def test_relation_matrices_are_multiplied_in_full_float32(level):
    # GPUs multiply float32 in TF32 and TPUs in bfloat16 by default: on an H200 that moved
    # batch_kd by 3e-4 from the numpy reference. The products must ask for HIGHEST precision.
    zs, zt = _logits(7, 4, 5)
    jaxpr = jax.make_jaxpr(lambda a, b: LEVELS[level](a, b))(zs, zt).jaxpr
    dots = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert len(dots) == 2
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert all(eqn.params["precision"] == highest for eqn in dots), [e.params for e in dots]


def test_class_logits_are_full_float32_scaled_cosines():
    from mtkd_jax.objectives import class_logits

    rng = np.random.default_rng(3)
    image = rng.normal(size=(4, 8)).astype(np.float32)
    text = rng.normal(size=(5, 8)).astype(np.float32)
    scale = np.float32(np.log(100.0))
    jaxpr = jax.make_jaxpr(class_logits)(image, text, scale).jaxpr
    (dot,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert dot.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2
    cosines = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (
        text / np.linalg.norm(text, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(class_logits(image, text, scale), 100.0 * cosines, rtol=1e-5)
