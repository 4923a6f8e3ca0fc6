"""Loading CLIP from foreign checkpoints, checked against reference implementations.

References: Hugging Face `transformers.CLIPModel` (random weights, `save_pretrained`), an
independent PyTorch forward of the OpenAI layout with IVLP deep prompts written below from the
description in the issue, and keras-hub's `CLIPBackbone`. All fixtures are generated here.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import mtkd_jax  # noqa: F401  (sets KERAS_BACKEND)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mtkd_jax.clip import CheckpointMismatchError, load  # noqa: E402
from mtkd_jax.clip.convert_openai import OPENAI_BUFFERS  # noqa: E402

VOCAB, EOT, SOT = 49408, 49407, 49406  # the real vocabulary size: fresh prompts use its ids
WIDTH, HEADS, LAYERS, EMBED, IMAGE, PATCH = 128, 2, 3, 16, 32, 8  # heads = width // 64, as OpenAI


def close(actual, expected, scale=1e-4):
    """max |a - e| ≤ scale × the largest feature norm (the project's parity bar)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    norm = np.linalg.norm(expected, axis=-1).max()
    err = np.abs(actual - expected).max()
    assert err <= scale * norm, f"max abs error {err} > {scale} × norm {norm}"


def randomise(module, seed=0):
    """Every parameter random (LayerNorm gains near 1), so no mapping error hides behind 0/1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * noise)
            elif name == "logit_scale":
                parameter.fill_(2.3)
            else:
                parameter.copy_(0.1 * noise)


def hf_config(vision=None):
    vision = vision or dict(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    text = dict(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=77,
        eos_token_id=EOT,
        bos_token_id=SOT,
        pad_token_id=0,
    )
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random tiny `CLIPModel` saved with `save_pretrained`: (directory, torch model)."""
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config()).eval()
    randomise(model)
    directory = str(tmp_path_factory.mktemp("hf_clip"))
    model.save_pretrained(directory)
    return directory, model


def inputs(n_images=2, n_texts=3, seed=0, prompt_length=0, image=IMAGE):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, image, image, 3)).astype(np.float32)
    ids = np.zeros((n_texts, 77), np.int64)
    for row, length in enumerate(rng.integers(prompt_length + 2, 20, size=n_texts)):
        ids[row, 0] = SOT
        ids[row, 1:length] = rng.integers(1, VOCAB - 2, size=length - 1)
        ids[row, length] = EOT
    return images, ids


def hf_outputs(model, images, ids):
    with torch.no_grad():
        pixels = torch.tensor(images).permute(0, 3, 1, 2)
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=torch.tensor(ids))
        image = getattr(image, "pooler_output", image).numpy()
        text = getattr(text, "pooler_output", text).numpy()
        logits = model(input_ids=torch.tensor(ids), pixel_values=pixels).logits_per_image.numpy()
    return image, text, logits


_FORWARDS = {}


def our_outputs(model, images, ids):
    """The model's outputs through one jitted stateless call, compiled once per architecture
    (much faster on CPU than eager op-by-op dispatch)."""
    import jax

    key = (model.config, model.dtype_policy.name)
    if key not in _FORWARDS:
        _FORWARDS[key] = jax.jit(lambda t, n, x: model.stateless_call(t, n, x)[0])
    values = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]
    out = _FORWARDS[key](values, others, {"images": images, "token_ids": ids.astype(np.int32)})
    return tuple(np.asarray(out[k]) for k in ("image_features", "text_features", "logits"))


# ------------------------------------------------------------------- OpenAI layout, in the test


def hf_to_openai(state):
    """Hugging Face CLIPModel names → OpenAI CLIP names (written here, not from convert_hf)."""
    state = {k: v.detach().clone().float() for k, v in state.items()}
    out = {
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
        "logit_scale": state["logit_scale"],
    }
    for hf_prefix, prefix in (
        ("vision_model", "visual.transformer"),
        ("text_model", "transformer"),
    ):
        for i in range(LAYERS):
            h, o = f"{hf_prefix}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            qkv = [state[f"{h}.self_attn.{x}_proj.weight"] for x in "qkv"]
            out[f"{o}.attn.in_proj_weight"] = torch.cat(qkv)
            out[f"{o}.attn.in_proj_bias"] = torch.cat(
                [state[f"{h}.self_attn.{x}_proj.bias"] for x in "qkv"]
            )
            for ours, theirs in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                for kind in ("weight", "bias"):
                    out[f"{o}.{ours}.{kind}"] = state[f"{h}.{theirs}.{kind}"]
    return out


def reference_forward(state, images, ids, vision_prompts=(), text_prompts=()):
    """OpenAI CLIP forward with IVLP deep prompts, in plain torch, from the issue's description.

    vision_prompts / text_prompts: lists of `[n, width]` tensors for layers 0 … depth-1.
    Returns un-normalised image and text features.
    """
    t = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in state.items()}
    f = torch.nn.functional

    def ln(x, name):
        return f.layer_norm(x, x.shape[-1:], t[f"{name}.weight"], t[f"{name}.bias"], 1e-5)

    def block(x, name, heads, causal):
        b, n, w = x.shape
        y = ln(x, f"{name}.ln_1")
        q, k, v = (y @ t[f"{name}.attn.in_proj_weight"].T + t[f"{name}.attn.in_proj_bias"]).chunk(
            3, -1
        )
        split = lambda z: z.reshape(b, n, heads, w // heads).transpose(1, 2)
        scores = split(q) @ split(k).transpose(-1, -2) / (w // heads) ** 0.5
        if causal:
            scores = scores + torch.full((n, n), float("-inf")).triu(1)
        a = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, w)
        x = x + a @ t[f"{name}.attn.out_proj.weight"].T + t[f"{name}.attn.out_proj.bias"]
        h = ln(x, f"{name}.ln_2") @ t[f"{name}.mlp.c_fc.weight"].T + t[f"{name}.mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        return x + h @ t[f"{name}.mlp.c_proj.weight"].T + t[f"{name}.mlp.c_proj.bias"]

    with torch.no_grad():
        conv = t["visual.conv1.weight"]
        x = f.conv2d(torch.tensor(images).permute(0, 3, 1, 2), conv, stride=conv.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        b, width = x.shape[0], x.shape[-1]
        x = torch.cat([t["visual.class_embedding"].expand(b, 1, width), x], 1)
        x = x + t["visual.positional_embedding"]
        if vision_prompts:
            x = torch.cat([x, vision_prompts[0].expand(b, -1, -1)], 1)
        x = ln(x, "visual.ln_pre")
        layers = len([k for k in t if k.endswith("attn.in_proj_weight") and "visual" in k])
        for i in range(layers):
            if 0 < i < len(vision_prompts):
                n = vision_prompts[i].shape[0]
                x = torch.cat([x[:, :-n], vision_prompts[i].expand(b, -1, -1)], 1)
            x = block(x, f"visual.transformer.resblocks.{i}", width // 64, False)
        image = ln(x[:, 0], "visual.ln_post") @ t["visual.proj"]

        ids = torch.as_tensor(ids)
        x = t["token_embedding.weight"][ids]
        b, width = x.shape[0], x.shape[-1]
        if text_prompts:
            n = text_prompts[0].shape[0]
            x = torch.cat([x[:, :1], text_prompts[0].expand(b, -1, -1), x[:, 1 + n :]], 1)
        x = x + t["positional_embedding"]
        for i in range(layers):
            if 0 < i < len(text_prompts):
                n = text_prompts[i].shape[0]
                x = torch.cat([x[:, :1], text_prompts[i].expand(b, -1, -1), x[:, 1 + n :]], 1)
            x = block(x, f"transformer.resblocks.{i}", width // 64, True)
        x = ln(x, "ln_final")
        text = x[torch.arange(b), ids.argmax(-1)] @ t["text_projection"]
    return image.numpy(), text.numpy()


def openai_file(tmp_path, model, dtype=torch.float16):
    """The model in OpenAI's layout, saved like OpenAI's weights (float16, int buffers)."""
    state = {k: v.to(dtype) for k, v in hf_to_openai(model.state_dict()).items()}
    state.update(
        input_resolution=torch.tensor(IMAGE), context_length=torch.tensor(77),
        vocab_size=torch.tensor(VOCAB),
    )  # fmt: skip
    path = str(tmp_path / "ViT-tiny.pt")
    torch.save(state, path)
    return path, {k: v.float().numpy() for k, v in state.items()}


def promptkd_checkpoint(tmp_path, n=2, depth=2, seed=1, mtkd_names=False, drop=None, reshape=None):
    """A PromptKD-style `model-best.pth.tar`: prompts, derived buffers, some frozen weights."""
    generator = torch.Generator().manual_seed(seed)
    vision = [torch.randn(n, WIDTH, generator=generator) for _ in range(depth)]
    text = [torch.randn(n, WIDTH, generator=generator) for _ in range(depth)]
    state = {
        "prompt_learner.ctx": text[0],
        "prompt_learner.token_prefix": torch.randn(5, 1, WIDTH),
        "prompt_learner.token_suffix": torch.randn(5, 77 - 1 - n, WIDTH),
        "image_encoder.conv1.weight": torch.randn(WIDTH, 3, PATCH, PATCH),
        "text_encoder.positional_embedding": torch.randn(77, WIDTH),
        "logit_scale": torch.tensor(4.6),
    }
    vpt, shallow = ("initial_prompt", "new_prompt") if mtkd_names else ("VPT", "VPT_shallow")
    state[f"image_encoder.{vpt}"] = vision[0]
    for i in range(1, depth):
        state[f"image_encoder.transformer.resblocks.{i}.{shallow}"] = vision[i]
        state[f"text_encoder.transformer.resblocks.{i}.{shallow}"] = text[i]
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = torch.randn(n + 1, WIDTH)
    path = str(tmp_path / "model-best.pth.tar")
    torch.save({"state_dict": state, "epoch": 20, "optimizer": None}, path)
    return path, vision, text


# ------------------------------------------------------------------- tests


def test_hf_directory_matches_transformers(hf):
    directory, reference = hf
    images, ids = inputs()
    ours = our_outputs(load(directory), images, ids)
    for actual, expected in zip(ours, hf_outputs(reference, images, ids), strict=True):
        close(actual, expected)


def odd_sized_hf_clip(tmp_path, layer_norm_eps=1e-6, activation="gelu"):
    """A random CLIP whose sizes no OpenAI model has: MLP 3 × width (vision) and 2 × width
    (text), a LayerNorm epsilon of `layer_norm_eps`, exact GELU by default (LAION's ViT-bigG/14
    has MLP 8192 at width 1664)."""
    common = dict(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        layer_norm_eps=layer_norm_eps, hidden_act=activation,
    )  # fmt: skip
    config = transformers.CLIPConfig(
        vision_config=dict(
            intermediate_size=3 * WIDTH, image_size=IMAGE, patch_size=PATCH, **common
        ),
        text_config=dict(
            intermediate_size=2 * WIDTH, vocab_size=VOCAB, max_position_embeddings=77,
            eos_token_id=EOT, bos_token_id=SOT, pad_token_id=0, **common,
        ),
        projection_dim=EMBED,
    )  # fmt: skip
    torch.manual_seed(1)
    model = transformers.CLIPModel(config).eval()
    randomise(model, seed=3)
    directory = str(tmp_path / "odd_clip")
    model.save_pretrained(directory)
    return directory, model


def test_clip_with_other_mlp_sizes_and_epsilon_matches_transformers(tmp_path):
    """MLP sizes and LayerNorm epsilon come from the checkpoint, not from OpenAI's layout; the
    converted copy keeps them."""
    from mtkd_jax.clip import save

    directory, reference = odd_sized_hf_clip(tmp_path)
    clip = load(directory)
    config = clip.config
    assert (config.vision_mlp_size, config.text_mlp_size) == (3 * WIDTH, 2 * WIDTH)
    assert (config.layer_norm_eps, config.activation) == (1e-6, "gelu")
    images, ids = inputs()
    expected = hf_outputs(reference, images, ids)
    for actual, wanted in zip(our_outputs(clip, images, ids), expected, strict=True):
        close(actual, wanted)
    save(clip, str(tmp_path / "converted"))
    again = load(str(tmp_path / "converted"))
    assert again.config == config
    for actual, wanted in zip(our_outputs(again, images, ids), expected, strict=True):
        close(actual, wanted)


def test_openai_layout_with_other_mlp_sizes_loads_them(tmp_path):
    """The OpenAI layout carries no sizes in a config: the MLP sizes are read off the weights."""
    _, model = odd_sized_hf_clip(tmp_path, layer_norm_eps=1e-5, activation="quick_gelu")
    state = {k: v.float() for k, v in hf_to_openai(model.state_dict()).items()}
    path = str(tmp_path / "odd.pt")
    torch.save(state, path)
    clip = load(path)
    assert (clip.config.vision_mlp_size, clip.config.text_mlp_size) == (3 * WIDTH, 2 * WIDTH)
    images, ids = inputs()
    hf_image, hf_text, _ = hf_outputs(model, images, ids)
    image, text, _ = our_outputs(clip, images, ids)
    close(image, hf_image)
    close(text, hf_text)


def test_independent_reference_matches_transformers(hf):
    """The torch reference used for prompts is itself checked against transformers."""
    _, model = hf
    images, ids = inputs()
    image, text = reference_forward(hf_to_openai(model.state_dict()), images, ids)
    hf_image, hf_text, _ = hf_outputs(model, images, ids)
    close(image, hf_image, 1e-5)
    close(text, hf_text, 1e-5)


def test_openai_float16_state_dict_loads_to_float32_and_matches(hf, tmp_path):
    _, model = hf
    path, state = openai_file(tmp_path, model)
    clip = load(path)
    assert clip.config.vision_layers == LAYERS and clip.config.image_size == IMAGE
    assert all(v.dtype == "float32" for v in clip.weights)
    images, ids = inputs()
    image, text, _ = our_outputs(clip, images, ids)
    ref_image, ref_text = reference_forward(state, images, ids)
    close(image, ref_image)
    close(text, ref_text)


def _torchscript_archive(state, path):
    root = torch.nn.Module()
    for name, value in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if value.dtype.is_floating_point:
            module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)

    class Archive(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for child_name, child in root.named_children():
                self.add_module(child_name, child)
            for param_name, param in root.named_parameters(recurse=False):
                self.register_parameter(param_name, param)
            for buffer_name, buffer in root.named_buffers(recurse=False):
                self.register_buffer(buffer_name, buffer)

        def forward(self, x):
            return x

    torch.jit.save(torch.jit.script(Archive()), path)


def test_torchscript_archive_matches(hf, tmp_path):
    _, model = hf
    _, state = openai_file(tmp_path, model)
    path = str(tmp_path / "ViT-tiny-jit.pt")
    tensors = {k: torch.tensor(v).half() if v.ndim or k == "logit_scale" else torch.tensor(v)
               for k, v in state.items()}  # fmt: skip
    for key in OPENAI_BUFFERS:
        tensors[key] = torch.tensor(int(state[key]))
    _torchscript_archive(tensors, path)
    images, ids = inputs()
    image, text, _ = our_outputs(load(path), images, ids)
    ref_image, ref_text = reference_forward(state, images, ids)
    close(image, ref_image)
    close(text, ref_text)


@pytest.mark.parametrize("mtkd_names", [False, True], ids=["promptkd", "mtkd_reference"])
def test_prompt_checkpoint_matches_independent_reference(hf, tmp_path, mtkd_names):
    _, model = hf
    base, state = openai_file(tmp_path, model, dtype=torch.float32)
    prompts, vision, text = promptkd_checkpoint(tmp_path, mtkd_names=mtkd_names)
    clip = load(base, prompts=prompts)
    assert (clip.config.vision_prompt_length, clip.config.vision_prompt_depth) == (2, 2)
    assert (clip.config.text_prompt_length, clip.config.text_prompt_depth) == (2, 2)
    images, ids = inputs(prompt_length=2)
    image, text_features, _ = our_outputs(clip, images, ids)
    ref_image, ref_text = reference_forward(state, images, ids, vision, text)
    plain_image, _ = reference_forward(state, images, ids)
    assert np.abs(ref_image - plain_image).max() > 1e-2  # the prompts do change the output
    close(image, ref_image)
    close(text_features, ref_text)


@pytest.mark.parametrize(
    "problem",
    [
        dict(drop="image_encoder.transformer.resblocks.1.VPT_shallow"),
        dict(drop="prompt_learner.ctx"),
        dict(reshape="text_encoder.transformer.resblocks.1.VPT_shallow"),
    ],
    ids=["missing_shallow", "missing_ctx", "wrong_shape"],
)
def test_bad_prompt_checkpoint_lists_the_name(hf, tmp_path, problem):
    _, model = hf
    base, _ = openai_file(tmp_path, model)
    prompts, _, _ = promptkd_checkpoint(tmp_path, depth=3, **problem)
    name = problem.get("drop") or problem.get("reshape")
    with pytest.raises(CheckpointMismatchError, match=name.replace(".", r"\.")):
        load(base, prompts=prompts)


def test_unexpected_and_missing_base_tensors_are_listed_together(hf, tmp_path):
    _, model = hf
    state = {k: v.half() for k, v in hf_to_openai(model.state_dict()).items()}
    state["visual.extra_head.weight"] = torch.zeros(3)
    del state["ln_final.bias"]
    state["visual.proj"] = torch.zeros(WIDTH, EMBED + 1)
    path = str(tmp_path / "bad.pt")
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as error:
        load(path)
    message = str(error.value)
    for name in ("visual.extra_head.weight", "ln_final.bias", "visual.proj"):
        assert name in message


def test_keras_hub_preset_matches_keras_hub_backbone(tmp_path):
    import keras
    import keras_hub

    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=PATCH, hidden_dim=WIDTH, num_layers=2, num_heads=HEADS,
        intermediate_dim=4 * WIDTH, image_shape=(IMAGE, IMAGE, 3),
    )  # fmt: skip
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=VOCAB, embedding_dim=WIDTH, hidden_dim=WIDTH, num_layers=2,
        num_heads=HEADS, intermediate_dim=4 * WIDTH,
    )  # fmt: skip
    backbone = keras_hub.models.CLIPBackbone(vision, text, projection_dim=EMBED)
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        if variable.dtype.startswith("float"):
            variable.assign(0.1 * rng.normal(size=variable.shape) + ("gamma" in variable.path))
    positions = vision.embedding.position_ids
    positions.assign(np.arange(positions.shape[1])[None])  # as released presets store them
    backbone.save_to_preset(str(tmp_path / "preset"))
    clip = load(f"keras_hub:{tmp_path / 'preset'}")
    images, ids = inputs()
    image, text_features, _ = our_outputs(clip, images, ids)
    expected_image = keras.ops.convert_to_numpy(backbone.get_vision_embeddings(images))
    expected_text = keras.ops.convert_to_numpy(backbone.get_text_embeddings(ids))
    close(image, expected_image)
    close(text_features, expected_text)  # keras-hub's final LayerNorm uses eps 1e-6, ours 1e-5


def test_real_vit_b16_vision_tower_matches_transformers(tmp_path):
    vision = dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16,
    )  # fmt: skip
    model = transformers.CLIPModel(hf_config(vision)).eval()
    randomise(model.vision_model, seed=3)
    model.save_pretrained(str(tmp_path))
    images, ids = inputs(n_images=1, n_texts=1, image=224)
    clip = load(str(tmp_path))
    assert clip.config.vision_width == 768 and clip.config.patch_size == 16
    close(our_outputs(clip, images, ids)[0], hf_outputs(model, images, ids)[0])


def test_bfloat16_stays_close_to_float32(hf):
    directory, _ = hf
    images, ids = inputs()
    f32 = our_outputs(load(directory), images, ids)
    bf16 = our_outputs(load(directory, dtype="bfloat16"), images, ids)
    for low, full in zip(bf16[:2], f32[:2], strict=True):
        relative = np.linalg.norm(low.astype(np.float32) - full) / np.linalg.norm(full)
        assert relative < 2e-2


def test_convert_then_load_without_torch(hf, tmp_path):
    from mtkd_jax import convert

    _, model = hf
    base, _ = openai_file(tmp_path, model)
    prompts, _, _ = promptkd_checkpoint(tmp_path)
    destination = tmp_path / "converted"
    convert.main([base, str(destination), "--prompts", prompts])
    with pytest.raises(SystemExit):
        convert.main([base, str(destination), "--prompts", prompts])  # refuses to overwrite
    images, ids = inputs(prompt_length=2)
    expected = our_outputs(load(base, prompts=prompts), images, ids)
    np.savez(tmp_path / "inputs.npz", images=images, ids=ids)
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import numpy as np, mtkd_jax\n"
        "from mtkd_jax.clip import load\n"
        f"data = np.load({str(tmp_path / 'inputs.npz')!r})\n"
        f"out = load({str(destination)!r})({{'images': data['images'], "
        "'token_ids': data['ids']})\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, "
        "**{k: np.asarray(v) for k, v in out.items()})\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    out = np.load(tmp_path / "out.npz")
    for key, value in zip(("image_features", "text_features", "logits"), expected, strict=True):
        close(out[key], value, 1e-5)  # same weights; only eager vs jitted rounding differs


def test_fresh_prompts_start_from_a_photo_of_a(hf):
    directory, _ = hf
    settings = dict(vision_prompt_length=4, vision_prompt_depth=2, text_prompt_length=4,
                    text_prompt_depth=2)  # fmt: skip
    clip = load(directory, prompts=settings)
    from mtkd_jax.clip.tokenizer import CLIPTokenizer

    ids = CLIPTokenizer().encode("a photo of a")
    table = np.asarray(clip.text.embedding.token_embedding.embeddings)
    np.testing.assert_array_equal(np.asarray(clip.text.prompts.tokens[0]), table[ids])


def test_converted_checkpoint_takes_fresh_prompts_for_stage_0(tmp_path):
    from mtkd_jax.clip import CLIP, CLIPConfig
    from mtkd_jax.clip import load as load_clip
    from mtkd_jax.clip import save as save_native
    from mtkd_jax.clip.tokenizer import CLIPTokenizer

    plain = CLIP(CLIPConfig.preset("tiny"))
    save_native(plain, tmp_path / "converted")
    settings = {"vision_prompt_length": 4, "vision_prompt_depth": 2,
                "text_prompt_length": 4, "text_prompt_depth": 2}  # fmt: skip
    prompted = load_clip(tmp_path / "converted", prompts=settings)
    assert len(prompted.prompt_variables()) == 4
    carried = {v.path: np.asarray(v.value) for v in plain.weights}
    prompt_ids = {id(v) for v in prompted.prompt_variables()}
    for variable in prompted.weights:
        if id(variable) not in prompt_ids:
            np.testing.assert_array_equal(np.asarray(variable.value), carried[variable.path])
    ids = CLIPTokenizer().encode("a photo of a")
    table = np.asarray(prompted.text.embedding.token_embedding.embeddings)
    np.testing.assert_array_equal(np.asarray(prompted.text.prompts.tokens[0]), table[ids])
    with pytest.raises(ValueError, match="fresh prompt settings"):
        load_clip(tmp_path / "converted", prompts=str(tmp_path / "model-best.pth.tar"))


def test_real_vit_l14_matches_transformers(tmp_path):
    """Both towers at the teacher's real shapes (428M parameters; about 30 s on 2 cores)."""
    vision = dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14,
    )  # fmt: skip
    text = dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, eos_token_id=49407,
        bos_token_id=49406, pad_token_id=0,
    )  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
    model = transformers.CLIPModel(config).eval()
    randomise(model, seed=5)
    model.save_pretrained(str(tmp_path))
    images, _ = inputs(n_images=2, n_texts=1, image=224)
    from mtkd_jax.clip.tokenizer import CLIPTokenizer

    ids = CLIPTokenizer().tokenize(["a photo of a cat.", "a photo of a dog."]).astype(np.int64)
    clip = load(str(tmp_path))
    assert clip.config == clip.config.preset("ViT-L/14")
    ours, theirs = our_outputs(clip, images, ids), hf_outputs(model, images, ids)
    close(ours[0], theirs[0])  # image features
    close(ours[1], theirs[1])  # text features
    # Logits are exp(logit_scale) · cosine: the bar is 1e-4 of that scale (random features are
    # nearly orthogonal here, so the logits' own norm is far below it).
    scale = float(model.logit_scale.exp())
    assert np.abs(ours[2] - theirs[2]).max() <= 1e-4 * scale
