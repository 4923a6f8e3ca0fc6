"""Command line of mtkd_jax: absl flags -> `RunConfig` -> `experiment.run`.

    python -m mtkd_jax.main                                   # the offline demo (shapes world)
    python -m mtkd_jax.main --stage=1 --dataset=oxford_pets   # stage 1 on a real dataset
    python -m mtkd_jax.main --stage=2 --dataset=oxford_pets   # then stage 2
    python -m mtkd_jax.main --flagfile=flags/oxford_pets.flags

Every flag is a field of `mtkd_jax.config.RunConfig`; the work itself is the library function
`mtkd_jax.experiment.run`, which notebooks call too.
"""

import dataclasses
import sys
import traceback
import typing

from absl import app, flags

from mtkd_jax import config as config_lib
from mtkd_jax import errors, stages
from mtkd_jax.distributed import PrimaryProcessError

# Errors that mean "the input, the run's state or the machine is not right": one line each.
# OSError covers what the system refuses (a missing file, permissions, a full disk); everything
# else is an mtkd_jax bug and keeps its traceback.
USER_ERRORS = (errors.UserError, OSError, PrimaryProcessError)
BUG_REPORT = (
    "This is a bug in mtkd_jax, not a problem with your settings: please report it with the "
    "command line and the traceback above."
)

HELP = {
    "stage": "Which stage to run, or all of them in order: "
    + "; ".join(
        f"{step}: {s.name}, {s.summary}"
        for step in stages.STEPS
        for s in stages.STAGES
        if step in s.steps and not s.baseline
    )
    + ".",
    "dataset": "Dataset name (e.g. oxford_pets, dtd, eurosat, shapes) or folder:/path/to/classes.",
    "data_source": "Where the data comes from: tfds, coop (CoOp DATA/ layout) or auto.",
    "data_root": "Root of the CoOp-style DATA/ folder (coop and medical datasets).",
    "tfds_data_dir": "TFDS data_dir; empty for TFDS's default.",
    "shots": "K: labeled images per class for stage 0 and stage 2.",
    "stage1_shots": "K of stage 1's unlabeled pool when --unlabeled_pool=fewshot (0: --shots). "
    "The reference trains stage 1 once on 5 shots and stage 2 at each K.",
    "seed": "Seed of the few-shot sample, the data order and the initialisation.",
    "workdir": "Where flags, metrics, checkpoints, results and the exported model go "
    "(default: runs/<dataset>_<shots>shot_seed<seed>).",
    "teacher": "Teacher CLIP: a Hugging Face dir, hf:<repo>, an OpenAI .pt, keras_hub:<preset>, "
    "a converted mtkd_jax dir, or 'shapes' (the embedded tiny CLIP). Default: ViT-L/14 "
    "(shapes for the demo).",
    "teacher_prompts": "PromptKD/PromptSRC teacher checkpoint (model-best.pth.tar) or our own "
    "prompts file; empty: the stage-0 prompts in --workdir if any.",
    "teacher_prompt_length": "Deep-prompt tokens per encoder of the teacher (0: plain CLIP).",
    "teacher_prompt_depth": "Layers of the teacher that carry deep prompts.",
    "student": "Student: clip:<CLIP source> (frozen CLIP image encoder with visual prompts), "
    "keras_hub:<backbone preset>, tiny_resnet (the demo's) or tiny_vit. Default: CLIP ViT-B/16.",
    "student_prompt_length": "Visual deep-prompt tokens of a CLIP student.",
    "student_prompt_depth": "Layers of a CLIP student that carry visual deep prompts.",
    "reduction": "Residual adapter bottleneck reduction (stage 2).",
    "residual_ratio": "Residual adapter mixing ratio: ratio*adapter(x) + (1-ratio)*x.",
    "image_size": "Input resolution; 0 takes the teacher's.",
    "min_crop_scale": "Smallest area of the training random resized crop, as a fraction of the "
    "image (the paper's 0.08).",
    "dtype": "Compute dtype: float32, or bfloat16 (float32 variables, optimizer and losses).",
    "multihost": "Call jax.distributed.initialize() first (a multi-host TPU pod or GPU cluster; "
    "each process then reads its own share of every batch and process 0 writes the files). "
    "With no launch flag below, JAX detects the cluster (TPU pod, SLURM, Open MPI, Kubernetes).",
    "coordinator_address": "With --multihost: HOST:PORT of process 0's coordinator ('': detect).",
    "num_processes": "With --multihost: the number of processes of the job (0: detect).",
    "process_id": "With --multihost: this process's index, 0 .. num_processes-1 (-1: detect).",
    "local_device_ids": "With --multihost: the local device ids this process uses, "
    "comma-separated (empty: all, or what JAX detects).",
    "optimizer": "sgd (the paper's, with momentum) or adamw.",
    "lr": "Peak learning rate (after warm-up), cosine-decayed to 0.",
    "momentum": "SGD momentum.",
    "weight_decay": "Weight decay (L2 on the trained variables).",
    "warmup_epochs": "Epochs at the constant warm-up learning rate before the cosine schedule.",
    "warmup_lr": "The constant warm-up learning rate.",
    "epochs": "Epochs of every stage and baseline unless --teacher_epochs, --adapter_epochs or "
    "--supervised_epochs say otherwise.",
    "teacher_epochs": "Epochs of stage 0 (0: --epochs).",
    "adapter_epochs": "Epochs of stage 2 (0: --epochs).",
    "supervised_epochs": "Epochs of the supervised K-shot baseline (0: --epochs).",
    "batch_size": "Global training batch size, split over all devices (must divide evenly).",
    "eval_batch_size": "Global evaluation batch size (the last batch is padded and masked).",
    "temperatures": "Distillation temperatures, summed over (the paper's: 1,2,3,5,6).",
    "loss_weights": "Weights of the instance, batch and class levels (1,0,0 = PromptKD-style).",
    "kd_weight": "Weight of the whole distillation loss in stage 1.",
    "prompt_regularisation": "Stage 0: PromptSRC self-regularisation towards the frozen CLIP.",
    "prompt_reg_text_weight": "Stage 0: weight of the L1 distance to the frozen CLIP's class "
    "text features (PromptSRC: 25).",
    "prompt_reg_image_weight": "Stage 0: weight of the L1 distance to the frozen CLIP's image "
    "features (PromptSRC: 10).",
    "prompt_reg_logit_weight": "Stage 0: weight of the KL to the frozen CLIP's zero-shot logits "
    "(PromptSRC: 1).",
    "unlabeled_pool": "Stage-1 images: fewshot (the K-shot set, labels dropped) or train "
    "(the whole training split, labels dropped).",
    "base_to_novel": "Train stages 0 and 2 on the base classes only and report base/novel/HM.",
    "stage2_classes": "Stage 2 and the supervised baseline train on the shots of the base "
    "classes against the base classes' text features (base), or of all classes against all "
    "(all, the reference's; novel accuracy then no longer measures transfer to unseen classes).",
    "epoch_selection": "Which epoch each student stage keeps: last, val (best accuracy on the "
    "held-out few-shot validation images) or test_base (best base accuracy on TEST images, as "
    "the reference's Dassl best_val does; selection on test images, optimistic).",
    "reference_data": "Use the reference's own data files when present: Dassl's "
    "split_fewshot/shot_<K>-seed_<S>.pkl few-shot samples (read safely) and the MTKD medical "
    "split files (split_BACH.json, split_brain.json, split_eyedr.json) with folder class names.",
    "strict_data": "Stop on the first unusable image file (empty, not an image, truncated, "
    "corrupt, too large), naming it. --nostrict_data skips such files instead and lists each in "
    "the log and in results.json (skipped_images).",
    "data_threads": "TensorFlow op threads for the input pipeline (0: TensorFlow's default). On a "
    "small CPU machine 1 leaves the cores to XLA; the demo uses 1.",
    "eval_every": "Also evaluate each student stage on the test images every N epochs, into "
    "metrics.jsonl (kind eval; 0: only after each stage).",
    "log_every": "Steps between metric logs (and host syncs).",
    "resume": "Continue the run found in --workdir from its last checkpoint.",
    "overwrite": "Start afresh in a --workdir that holds this run's stages: --stage=all removes "
    "the files mtkd_jax writes there (nothing else), a single --stage only its own checkpoints "
    "(earlier stages stay). Only a workdir mtkd_jax created (it holds .mtkd_jax_workdir) is "
    "cleared.",
    "export": "Export the deployable student (one .keras file) after stage 2.",
    "baselines": "Extra methods to run for comparison, with the --stage they belong to: "
    + "; ".join(
        f"{s.baseline} ({s.summary}; --stage={'/'.join(s.steps)})"
        for s in stages.STAGES
        if s.baseline
    )
    + ".",
}


class _ChoiceListParser(flags.ListParser):
    """A comma-separated list whose items must each be one of `choices` (refused at parsing)."""

    def __init__(self, choices):
        super().__init__()
        self.choices = tuple(choices)

    def parse(self, argument):
        items = super().parse(argument)
        wrong = [item for item in items if item not in self.choices]
        if wrong:
            raise ValueError(
                f"{', '.join(map(repr, wrong))} not among the valid choices "
                f"<{'|'.join(self.choices)}>"
            )
        return items


def _define_flags() -> None:
    """Defines one absl flag per `RunConfig` field, with the field's default.

    A field with a fixed set of values (`config.CHOICES`) becomes an enum flag, or a list flag
    that checks its items: a wrong value is refused while parsing, naming the valid choices.
    """
    hints = typing.get_type_hints(config_lib.RunConfig)
    for field in dataclasses.fields(config_lib.RunConfig):
        default, kind = field.default, hints[field.name]
        help_text = HELP[field.name]
        choices = config_lib.CHOICES.get(field.name)
        if choices and kind is str:
            flags.DEFINE_enum(field.name, default, choices, help_text)
        elif choices:
            flags.DEFINE(
                _ChoiceListParser(choices),
                field.name,
                list(default),
                f"<{'|'.join(choices)}>,...: {help_text}",
                serializer=flags.CsvListSerializer(","),
            )
        elif kind is bool:
            flags.DEFINE_bool(field.name, default, help_text)
        elif kind is int:
            flags.DEFINE_integer(field.name, default, help_text)
        elif kind is float:
            flags.DEFINE_float(field.name, default, help_text)
        elif kind is str:
            flags.DEFINE_string(field.name, default, help_text)
        elif typing.get_args(kind)[0] is float:
            flags.DEFINE_list(field.name, [str(v) for v in default], help_text)
        else:
            flags.DEFINE_list(field.name, list(default), help_text)


def config_from_flags(flag_values: flags.FlagValues) -> config_lib.RunConfig:
    """Reads the parsed flags into a validated `RunConfig` with the dataset's defaults."""
    hints = typing.get_type_hints(config_lib.RunConfig)
    values = {}
    for field in dataclasses.fields(config_lib.RunConfig):
        value = flag_values[field.name].value
        if isinstance(value, list):
            item_type = typing.get_args(hints[field.name])[0]
            try:
                value = tuple(item_type(v) for v in value if str(v).strip())
            except ValueError:
                raise errors.InputError(
                    f"--{field.name} takes comma-separated numbers. Received {','.join(value)}."
                ) from None
        values[field.name] = value
    if values["dataset"] == "shapes":
        # The demo's settings, except where a flag was given explicitly.
        for name, value in config_lib.DEMO_SETTINGS.items():
            if not flag_values[name].present:
                values[name] = value
    config = config_lib.with_dataset_defaults(config_lib.RunConfig(**values))
    config.validate()
    return config


_define_flags()
flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line error messages.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}. Use --flag=value.")
    try:
        config = config_from_flags(flags.FLAGS)
        from mtkd_jax import experiment  # Heavy imports (Keras, TensorFlow) after parsing.

        experiment.run(config)
    except USER_ERRORS as error:
        if flags.FLAGS.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
