"""The run configuration: every setting of one MTKD run, as one plain dataclass.

`main.py` fills it from absl flags; notebooks and tests build it directly. Defaults are the
paper's settings for real datasets; `with_dataset_defaults` fills the values that depend on the
dataset (teacher, student, workdir), so the embedded offline demo needs no flag at all.
"""

import dataclasses
import math
import re

from mtkd_jax import stages
from mtkd_jax.errors import InputError

DTYPES = ("float32", "bfloat16")
UNLABELED_POOLS = ("fewshot", "train")
OPTIMIZERS = ("sgd", "adamw")
DATA_SOURCES = ("auto", "tfds", "coop")
STAGE2_CLASSES = ("base", "all")
EPOCH_SELECTIONS = ("last", "val", "test_base")  # mtkd_jax.selection.CRITERIA
PAPER_TEACHER = "keras_hub:clip_vit_large_patch14"
PAPER_STUDENT = "clip:keras_hub:clip_vit_base_patch16"
DEMO_TEACHER = "shapes"
DEMO_STUDENT = "tiny_resnet"
EMBEDDED_STUDENTS = ("tiny_resnet", "tiny_vit")  # built with random weights, trained whole
STUDENT_PREFIXES = ("clip:", "keras_hub:")
STUDENT_KINDS = (*EMBEDDED_STUDENTS, "clip:<CLIP source>", "keras_hub:<image backbone preset>")


@dataclasses.dataclass
class RunConfig:
    """All settings of one run. Field names equal the absl flag names of `mtkd_jax.main`."""

    stage: str = "all"
    dataset: str = "shapes"
    data_source: str = "auto"
    data_root: str = "DATA"
    tfds_data_dir: str = ""
    shots: int = 16
    stage1_shots: int = 0
    seed: int = 1
    workdir: str = ""
    # Models.
    teacher: str = ""
    teacher_prompts: str = ""
    teacher_prompt_length: int = 4
    teacher_prompt_depth: int = 9
    student: str = ""
    student_prompt_length: int = 4
    student_prompt_depth: int = 9
    reduction: int = 24
    residual_ratio: float = 0.2
    image_size: int = 0
    min_crop_scale: float = 0.08
    dtype: str = "float32"
    multihost: bool = False
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: tuple[int, ...] = ()
    # Optimisation (paper: SGD 0.9, wd 5e-4, lr 0.005, 1 warm-up epoch at 1e-5, cosine, 20 ep).
    optimizer: str = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    epochs: int = 20
    teacher_epochs: int = 0
    adapter_epochs: int = 0
    supervised_epochs: int = 0
    batch_size: int = 8
    eval_batch_size: int = 64
    # Losses.
    temperatures: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 6.0)
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    kd_weight: float = 1.0
    prompt_regularisation: bool = True
    prompt_reg_text_weight: float = 25.0
    prompt_reg_image_weight: float = 10.0
    prompt_reg_logit_weight: float = 1.0
    # Data protocol.
    unlabeled_pool: str = "fewshot"
    base_to_novel: bool = True
    stage2_classes: str = "base"
    epoch_selection: str = "last"
    reference_data: bool = False
    strict_data: bool = True
    data_threads: int = 0
    # Bookkeeping.
    eval_every: int = 0
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    export: bool = True
    baselines: tuple[str, ...] = ()

    @property
    def keras_dtype(self) -> str | None:
        """The Keras dtype policy of the models: "mixed_bfloat16" for `--dtype=bfloat16`, else
        None (Keras's float32)."""
        return "mixed_bfloat16" if self.dtype == "bfloat16" else None

    @property
    def pool_shots(self) -> int:
        """K of stage 1's unlabeled pool when it is the few-shot set (`--stage1_shots`, else
        `--shots`)."""
        return self.stage1_shots or self.shots

    def validate(self) -> None:
        """Raises InputError (a ValueError) naming the first setting that cannot work, and the
        valid choices."""
        for name, valid in CHOICES.items():
            value = getattr(self, name)
            for item in value if isinstance(value, tuple) else (value,):
                if item not in valid:
                    raise InputError(
                        f"--{name}={item!r} is not one of {', '.join(valid)}."
                        if not isinstance(value, tuple)
                        else f"--{name} takes a comma-separated list of {', '.join(valid)}. "
                        f"Received {item!r}."
                    )
        positive = ("shots", "batch_size", "eval_batch_size", "epochs", "reduction", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InputError(f"--{name} must be positive. Received {getattr(self, name)}.")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise InputError(f"--temperatures must be positive. Received {self.temperatures}.")
        if len(self.loss_weights) != 3:
            raise InputError(
                "--loss_weights takes three numbers (instance, batch, class). "
                f"Received {self.loss_weights}."
            )
        for name in ("teacher_epochs", "adapter_epochs", "supervised_epochs", "stage1_shots"):
            if getattr(self, name) < 0:
                default = "--shots" if name == "stage1_shots" else "--epochs"
                raise InputError(
                    f"--{name} must be >= 0 (0: {default}). Received {getattr(self, name)}."
                )
        if self.student and not (
            self.student in EMBEDDED_STUDENTS or self.student.startswith(STUDENT_PREFIXES)
        ):
            raise InputError(
                f"Unknown --student={self.student!r}. Valid kinds: {', '.join(STUDENT_KINDS)}."
            )
        if self.eval_every < 0:
            raise InputError(f"--eval_every must be >= 0 (0: never). Received {self.eval_every}.")
        if self.data_threads < 0:
            raise InputError(f"--data_threads must be >= 0. Received {self.data_threads}.")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise InputError(f"--min_crop_scale must be in (0, 1]. Received {self.min_crop_scale}.")
        if not 0.0 <= self.residual_ratio <= 1.0:
            raise InputError(f"--residual_ratio must be in [0, 1]. Received {self.residual_ratio}.")
        if not all(math.isfinite(v) for v in (self.lr, self.kd_weight, self.weight_decay)):
            raise InputError("--lr, --kd_weight and --weight_decay must be finite numbers.")
        self._validate_launch()

    def _validate_launch(self) -> None:
        """The multi-process launch flags (`jax.distributed.initialize`'s arguments)."""
        given = [
            name
            for name, unset in (
                ("coordinator_address", ""),
                ("num_processes", 0),
                ("process_id", -1),
                ("local_device_ids", ()),
            )
            if getattr(self, name) != unset
        ]
        if given and not self.multihost:
            raise InputError(
                f"--{given[0]} starts a multi-process run and needs --multihost too. Received "
                f"{', '.join(f'--{name}={getattr(self, name)}' for name in given)} without "
                "--multihost."
            )
        if self.num_processes < 0 or self.process_id < -1:
            raise InputError(
                "--num_processes must be >= 1 (0: detect) and --process_id >= 0 (-1: detect). "
                f"Received --num_processes={self.num_processes} --process_id={self.process_id}."
            )
        if 0 < self.num_processes <= self.process_id:
            raise InputError(
                f"--process_id must be below --num_processes={self.num_processes} (processes "
                f"count from 0). Received --process_id={self.process_id}."
            )
        address = self.coordinator_address
        if address and not re.fullmatch(r"\[?[^\s/]+\]?:\d{1,5}", address):
            raise InputError(
                "--coordinator_address is HOST:PORT of process 0 (e.g. 10.0.0.1:1234). "
                f"Received {address!r}."
            )


# The offline demo (`python -m mtkd_jax.main` with no flags, `flags/demo.flags`): the settings
# that differ from the paper's. The shapes teacher has 4 layers (prompts to depth 3); the student
# is a small keras-hub ResNet (`tiny_resnet`, 8x fewer image FLOPs than the teacher) that learns
# from scratch, so it trains whole with AdamW on the whole unlabeled training split, in batches
# of 64, for as many epochs as fit a 3-minute CPU budget. The supervised baseline trains the same
# ResNet on the 4 shots for 100 epochs (its test accuracy stops rising by then). Crops keep at
# least 90% of a 32-px image: smaller ones cut the shape out of the picture.
DEMO_SETTINGS = {
    "dataset": "shapes",
    "shots": 4,
    "teacher_prompt_length": 4,
    "teacher_prompt_depth": 3,
    "student_prompt_length": 0,
    "student_prompt_depth": 0,
    "unlabeled_pool": "train",
    "optimizer": "adamw",
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "warmup_epochs": 0,
    "epochs": 4,
    "teacher_epochs": 10,
    "adapter_epochs": 20,
    "supervised_epochs": 100,
    "batch_size": 64,
    "min_crop_scale": 0.9,
    "eval_batch_size": 256,
    "data_threads": 1,
    "baselines": ("zero_shot", "supervised", "instance_only"),
}


# The settings that take one of a fixed set of values (a list of them for tuple fields): the
# command line refuses anything else at parsing, `RunConfig.validate` in the library.
CHOICES = {
    "stage": stages.STAGE_CHOICES,  # "0", "1", "2", "all": from the stages' steps
    "dtype": DTYPES,
    "unlabeled_pool": UNLABELED_POOLS,
    "optimizer": OPTIMIZERS,
    "data_source": DATA_SOURCES,
    "baselines": stages.BASELINES,
    "stage2_classes": STAGE2_CLASSES,
    "epoch_selection": EPOCH_SELECTIONS,
}


def demo_config(**overrides) -> RunConfig:
    """The offline demo's `RunConfig`, with optional changes (e.g. `epochs=2`, `workdir=...`)."""
    return with_dataset_defaults(RunConfig(**{**DEMO_SETTINGS, **overrides}))


def with_dataset_defaults(config: RunConfig) -> RunConfig:
    """Fills the settings left empty with the defaults for the run's dataset."""
    demo = config.dataset == "shapes"
    return dataclasses.replace(
        config,
        teacher=config.teacher or (DEMO_TEACHER if demo else PAPER_TEACHER),
        student=config.student or (DEMO_STUDENT if demo else PAPER_STUDENT),
        workdir=config.workdir
        or f"runs/{config.dataset.replace(':', '_').replace('/', '_')}"
        f"_{config.shots}shot_seed{config.seed}",
    )
