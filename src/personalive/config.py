"""Typed configuration: dataclass schemas here, values in YAML, overrides as `key=value` on the command line.

Merge order: schema defaults < the inference config file it names (official `inference_stage3.yaml` layout) <
the prompt YAML < command-line overrides. Unknown keys and wrong types are errors (OmegaConf struct mode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from personalive.errors import ConfigError, reason

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds configs/ in a source checkout


# ------------------------------------------------------------------------------------------------------------------
# PersonaLive-specific networks (sizes from YAML, defaults = official)


@dataclass
class MotionExtractorConfig:
    """LivePortrait motion extractor: ConvNeXt-V2 backbone with keypoint and head-pose heads."""

    depths: list[int] = field(default_factory=lambda: [3, 3, 9, 3])  # ConvNeXt-V2 tiny
    dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    num_kp: int = 21  # implicit 3D keypoints
    num_bins: int = 66  # head-pose bins of 3 degrees over [-97.5, 97.5]
    input_size: int = 256  # frames are resized to this square, values in [0, 1]


@dataclass
class MotionEncoderConfig:
    """FAN-based implicit motion encoder: face crop -> num_tokens motion tokens of token_dim features."""

    image_size: int = 224  # face crop side
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])  # stem, conv2/conv3, conv4 and hourglass
    hourglass_depth: int = 4
    num_landmarks: int = 68  # width of the FAN heat-map layer
    attention_dim: int = 1024  # inner width of the three spatial transformers
    attention_heads: int = 8
    norm_num_groups: int = 32
    num_tokens: int = 32
    token_dim: int = 16


@dataclass
class PoseGuiderConfig:
    """Keypoint canvas -> features added to the denoising UNet's conv_in output."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    out_channels: int = 320  # must equal the denoising UNet's block_out_channels[0]


@dataclass
class ModelConfig:
    motion_extractor: MotionExtractorConfig = field(default_factory=MotionExtractorConfig)
    motion_encoder: MotionEncoderConfig = field(default_factory=MotionEncoderConfig)
    pose_guider: PoseGuiderConfig = field(default_factory=PoseGuiderConfig)


# ------------------------------------------------------------------------------------------------------------------
# Official inference config (`configs/inference/inference_stage3.yaml`), same key names


@dataclass
class ModuleKwargs:
    """Settings of the motion modules (cross-attention to motion tokens) or temporal modules (self-attention)."""

    num_attention_heads: int = 8
    num_transformer_block: int = 1
    cross_attention_dim: Optional[int] = None
    attention_block_types: list[str] = field(default_factory=lambda: ["Temporal_Self", "Temporal_Self"])
    temporal_position_encoding: bool = False
    temporal_position_encoding_max_len: int = 32
    temporal_attention_dim_div: int = 1


@dataclass
class UNetAdditionalKwargs:
    use_inflated_groupnorm: bool = True
    unet_use_cross_frame_attention: bool = False
    unet_use_temporal_attention: bool = False
    use_motion_module: bool = True
    motion_module_resolutions: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    motion_module_mid_block: bool = True
    motion_module_decoder_only: bool = False
    motion_module_type: str = "Vanilla"
    motion_module_kwargs: ModuleKwargs = field(
        default_factory=lambda: ModuleKwargs(
            cross_attention_dim=16, attention_block_types=["Spatial_Cross", "Spatial_Cross"]
        )
    )
    use_temporal_module: bool = True
    temporal_module_type: str = "Vanilla"
    temporal_module_kwargs: ModuleKwargs = field(
        default_factory=lambda: ModuleKwargs(temporal_position_encoding=True)
    )


@dataclass
class SchedulerKwargs:
    """DDIM scheduler settings (diffusers names). Official: beta_end 0.02, not SD's 0.012."""

    beta_start: float = 0.00085
    beta_end: float = 0.02
    beta_schedule: str = "scaled_linear"
    clip_sample: bool = False
    steps_offset: int = 1
    prediction_type: str = "epsilon"
    timestep_spacing: str = "trailing"


# ------------------------------------------------------------------------------------------------------------------
# The run config (`configs/prompts/*.yaml`)


@dataclass
class PersonaLiveConfig:
    weights_dir: str = "pretrained_weights"  # official layout, see pretrained_weights/README.md
    inference_config: str = "configs/inference/inference_stage3.yaml"
    unet_additional_kwargs: UNetAdditionalKwargs = field(default_factory=UNetAdditionalKwargs)
    noise_scheduler_kwargs: SchedulerKwargs = field(default_factory=SchedulerKwargs)
    model: ModelConfig = field(default_factory=ModelConfig)

    sampler: str = "DDIM"
    batch_size: int = 1
    height: int = 512  # driving and output frames
    width: int = 512
    reference_image_height: int = 512
    reference_image_width: int = 512
    temporal_adaptive_step: int = 4  # micro-chunks in the window, each at its own noise level
    temporal_window_size: int = 4  # frames per micro-chunk
    num_inference_steps: int = 4  # DDIM steps: timesteps [999, 666, 333, 0]
    dtype: str = "fp16"  # fp16 | bf16 | fp32; fp16 falls back to fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    attention: str = "sdpa"  # sdpa | xformers
    # the convolution-heavy networks in channels-last memory: faster CPU convolutions (tools/benchmark.py --compare),
    # the same numbers up to float rounding (the official-fixture tests run with it)
    channels_last: bool = True
    # what decodes the latents to frames: "sd" (the SD VAE decoder, official) or "tiny" (TAESD, diffusers'
    # AutoencoderTiny from weights_dir/taesd/: about 2.4 of 8.5 TFLOP per frame less at full size, an approximation
    # of the SD decoder). The SD VAE still encodes the reference either way.
    vae_decoder: str = "sd"
    seed: int = 42  # seeds the engine's noise generator (and nothing global)
    fps: float = 16.0  # default driving frame rate of the web page
    keyframe_threshold: float = 17.0  # official: L2 distance over one frame's 32x16 motion tokens
    keyframe_start_step: int = 9  # official: the test runs once more than 8 steps have been taken
    max_keyframes: int = 3  # official online cap on historical keyframes
    # whose motion the keyframe test reads: "leaving" (the frame leaving the window: the official online wrapper) or
    # "entering" (the first frame of the newest chunk: the official offline script); null: the entry point's own
    # official choice (inference_offline.py: entering; the web server: leaving)
    keyframe_motion: Optional[str] = None

    def __post_init__(self) -> None:
        check = {
            "sampler": (self.sampler, {"DDIM"}),
            "dtype": (self.dtype, {"fp16", "bf16", "fp32"}),
            "attention": (self.attention, {"sdpa", "xformers"}),
            "vae_decoder": (self.vae_decoder, {"sd", "tiny"}),
            "keyframe_motion": (self.keyframe_motion, {None, "leaving", "entering"}),
        }
        for key, (value, allowed) in check.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not supported; use one of {sorted(allowed, key=str)}")
        if self.batch_size != 1:
            raise ConfigError(f"batch_size={self.batch_size}: the streaming engine serves one stream; use 1")
        for key in ("height", "width", "reference_image_height", "reference_image_width"):
            if getattr(self, key) % 8:
                raise ConfigError(f"{key}={getattr(self, key)} must be a multiple of 8 (VAE downsampling)")
        if self.num_inference_steps != self.temporal_adaptive_step:
            raise ConfigError(
                f"num_inference_steps={self.num_inference_steps} must equal temporal_adaptive_step="
                f"{self.temporal_adaptive_step}: each micro-chunk sits at one of the denoising steps"
            )
        kwargs = self.unet_additional_kwargs
        if kwargs.unet_use_cross_frame_attention or kwargs.unet_use_temporal_attention:
            raise ConfigError("unet_use_cross_frame_attention/unet_use_temporal_attention are not supported; set false")
        if not kwargs.use_inflated_groupnorm:
            raise ConfigError("use_inflated_groupnorm=false is not supported: group norms run per frame")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    @property
    def step_length(self) -> int:
        """Official: 333, so that 4 steps visit timesteps 999, 666, 333, 0."""
        return 999 // max(self.num_inference_steps - 1, 1)

    @property
    def timesteps(self) -> list[int]:
        """DDIM timesteps, noisiest first: [999, 666, 333, 0] for 4 steps."""
        return [999 - i * self.step_length for i in range(self.num_inference_steps)]


def resolve_path(path: str | Path) -> Path:
    """A relative path is taken from the working directory, else from the project root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type = PersonaLiveConfig) -> Any:
    """Build a typed config: defaults < inference config < YAML at `path` < `key=value` overrides."""
    try:
        base = OmegaConf.structured(schema)
        layers = [base]
        user = OmegaConf.load(resolve_path(path)) if path else OmegaConf.create()
        cli = OmegaConf.from_dotlist(list(overrides))
        inference_path = OmegaConf.select(cli, "inference_config") or OmegaConf.select(user, "inference_config")
        if inference_path is None and hasattr(schema, "inference_config"):
            inference_path = base.inference_config
        if inference_path:
            file = resolve_path(inference_path)
            if not file.exists():
                raise ConfigError(f"inference config {inference_path} not found; pass inference_config=<file>")
            layers.append(OmegaConf.load(file))
        merged = OmegaConf.merge(*layers, user, cli)
        return OmegaConf.to_object(merged)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} not found") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config ({path or 'defaults'}): {reason(e, 300)}") from e


# ------------------------------------------------------------------------------------------------------------------
# Training (`configs/train/*.yaml`, `python train.py`): the run config above (model sizes, window, scheduler) plus
# what a training run needs. A training config is therefore also a valid inference config for the same models.


@dataclass
class DataConfig:
    """How samples are cut from the talking-head videos in `data_dir` (see `personalive.training.data`)."""

    cache_dir: Optional[str] = None  # cache of tools/prepare_data.py; default <data_dir>/.personalive_cache
    use_cache: bool = True  # read the cache where it exists and is up to date (else keypoints are computed per step)
    extensions: list[str] = field(default_factory=lambda: [".mp4"])
    frames_per_sample: int = 1  # stages 1-2: target frames per reference (random frames of the same video)
    frame_stride: int = 1  # stage 3: take every n-th frame of the video for a clip
    max_frames: int = 0  # sample only the first n frames of each video (0: all); frames are decoded sequentially
    # the first target (stage 3: the clip's first frame) at most n frames from the reference (0: anywhere in the
    # video). Near references make copying the reference pay, which a small data set (one identity) does not teach
    reference_gap: int = 0
    # the reference and its targets get the same random gain per colour channel, in [1 - x, 1 + x]: their colours
    # can then only come from the reference, not from weights that memorised the data set (0: off)
    color_jitter: float = 0.0
    # the driver's face crops (the motion encoder's input) get their own random gain per colour channel, in
    # [1 - x, 1 + x]: in self-reenactment the crop is cut from the target itself, and would otherwise carry the
    # target's appearance past the reference (0: off)
    driver_jitter: float = 0.0
    # the chance that a sample is mirrored left-right (reference, targets and so the driver): twice the poses and
    # views from the same videos (0: off)
    hflip: float = 0.0
    # the chance that the reference is the first target itself (stage 3: the clip's first frame), so that the
    # model learns to return its reference unchanged where the driver does not move (0: only as `reference_gap` draws)
    self_reference: float = 0.0
    # the reference gets a random similarity warp of strength x (rotation up to 100x degrees, scale in [1 - x, 1 + x],
    # shift up to x of the size): its pose then never quite matches the target's, and copying it stops paying (0: off)
    reference_warp: float = 0.0
    # the chance that every target is the reference frame itself: a driver that stands still, whose right answer is
    # the reference unchanged (stage 3: a whole streamed clip of it; 0: off)
    still_clip: float = 0.0
    # every video appears n times per epoch, each time as a sample of its own: a data set of fewer videos than
    # train_batch_size (one clip, say) can then fill a batch
    repeats: int = 1
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class OptimConfig:
    """AdamW and a diffusers learning-rate schedule (`diffusers.optimization.get_scheduler` names)."""

    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"  # constant | constant_with_warmup | linear | cosine | ...
    lr_warmup_steps: int = 0


@dataclass
class DistillConfig:
    """Stage 2 (fewer-step appearance distillation): optional LPIPS perceptual loss and L1 pixel loss on the decoded
    clean prediction.

    LPIPS needs two local files (nothing is downloaded): torchvision's VGG16 weights and the LPIPS v0.1 linear
    layers for VGG (`lpips` package, weights/v0.1/vgg.pth). When either is missing the loss is L2 only."""

    perceptual_weight: float = 1.0  # 0 turns the perceptual loss off
    lpips_backbone: str = "pretrained_weights/eval/vgg16-397923af.pth"
    lpips_linear: str = "pretrained_weights/eval/lpips_vgg_v0.1.pth"
    pixel_weight: float = 0.0  # L1 of the decoded prediction against the frames ([0, 1] units), weighted as the L2


@dataclass
class SlidingConfig:
    """Stage 3 (sliding training): how the streaming window is simulated (see `personalive.training.stages`)."""

    rollout_steps: int = 3  # gradient-free window steps before the trained one (>= chunks - 1: all model outputs)
    # how frames leaving the window become historical keyframes: "distance", the inference rule (a frame whose motion
    # tokens are farther than keyframe_threshold from the reference's and every keyframe's, up to max_keyframes), or
    # "random" (the frame leaving at the last rollout step, with probability keyframe_prob)
    keyframe_rule: str = "distance"
    keyframe_prob: float = 0.25  # keyframe_rule=random: the chance per sample
    # how the window's chunks weigh in the clean-latent loss: "uniform", or "propagated", each by the share of its
    # squared error that reaches its next latent (alpha_bar of the next level; the oldest chunk's is the output)
    chunk_weighting: str = "uniform"


@dataclass
class TrainConfig(PersonaLiveConfig):
    """A training run. `weights_dir` gives the network configs and the frozen networks; `init_from` a previous
    stage's output. `seed` seeds the data order and every training-step generator; `dtype` is the frozen networks'
    dtype (fp32, or the `mixed_precision` dtype); trained networks stay fp32 (accelerate autocasts)."""

    stage: int = 1  # 1: hybrid motion | 2: fewer-step appearance distillation | 3: sliding temporal training
    dtype: str = "fp32"  # the frozen networks' dtype: fp32, or the mixed_precision dtype
    data_dir: str = "data/videos"
    output_dir: str = "outputs/train"
    init_from: Optional[str] = None  # a weights folder with every network (a previous stage's `final`/checkpoint)
    trainable_modules: Optional[list[str]] = None  # official file names; None: the stage's default
    train_batch_size: int = 1  # per process; stage 3 streams one clip at a time (1)
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000  # optimizer steps
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None  # keep only the newest n checkpoint-<step> folders
    resume_from_checkpoint: Optional[str] = "latest"  # latest (if any) | a checkpoint folder | null (start over)
    save_dtype: str = "fp32"  # dtype of the personalive/*.pth files written (official release: fp16)
    log_every: int = 1  # console log every n steps (metrics.jsonl and trackers get every step)
    report_to: str = "tensorboard"  # tensorboard (when installed) | none
    snr_gamma: Optional[float] = None  # Min-SNR-gamma loss weighting (training/losses.py; 5 is usual); None: off
    # exponential moving average of the trained weights (diffusers' EMAModel, decay min((1 + n) / (10 + n), x) at
    # step n); the weights written (checkpoints, final) are the average, resume restores it. None: off
    ema_decay: Optional[float] = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sliding: SlidingConfig = field(default_factory=SlidingConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        precisions = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
        check = {
            "stage": (self.stage, {1, 2, 3}),
            "mixed_precision": (self.mixed_precision, set(precisions)),
            "save_dtype": (self.save_dtype, {"fp32", "fp16", "bf16"}),
            "report_to": (self.report_to, {"tensorboard", "none"}),
            "device": (self.device, {"auto", "cpu"}),
        }
        for key, (value, allowed) in check.items():
            if value not in allowed:
                hint = "; GPUs are chosen by `accelerate launch`/CUDA_VISIBLE_DEVICES" if key == "device" else ""
                raise ConfigError(f"{key}={value!r} is not supported; use one of {sorted(allowed, key=str)}{hint}")
        if self.dtype not in ("fp32", precisions[self.mixed_precision]):
            raise ConfigError(f"dtype={self.dtype} (frozen networks) needs mixed_precision={self.dtype}; "
                              f"use dtype=fp32 or dtype={precisions[self.mixed_precision]}")
        for key in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                    "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be at least 1")
        if self.stage == 3 and self.train_batch_size != 1:
            raise ConfigError(f"train_batch_size={self.train_batch_size}: stage 3 streams one clip per process "
                              "(as inference); use 1 and gradient_accumulation_steps for a larger batch")
        if self.data.frames_per_sample < 1 or self.data.frame_stride < 1 or min(self.data.max_frames,
                                                                                 self.data.reference_gap) < 0:
            raise ConfigError("data.frames_per_sample and data.frame_stride must be >= 1, data.max_frames and "
                              "data.reference_gap >= 0")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"snr_gamma={self.snr_gamma} must be > 0 (or null: unweighted losses)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.999 (or null: no average)")
        for key in ("color_jitter", "driver_jitter"):
            if not 0 <= getattr(self.data, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self.data, key)} must be in [0, 1)")
        for key in ("hflip", "self_reference", "still_clip"):
            if not 0 <= getattr(self.data, key) <= 1:
                raise ConfigError(f"data.{key}={getattr(self.data, key)} must be a probability, in [0, 1]")
        if self.data.repeats < 1:
            raise ConfigError(f"data.repeats={self.data.repeats} must be >= 1")
        if not 0 <= self.data.reference_warp < 0.5:
            raise ConfigError(f"data.reference_warp={self.data.reference_warp} must be in [0, 0.5)")
        if self.sliding.rollout_steps < 0 or not 0 <= self.sliding.keyframe_prob <= 1:
            raise ConfigError("sliding.rollout_steps must be >= 0 and sliding.keyframe_prob in [0, 1]")
        if self.sliding.keyframe_rule not in ("distance", "random"):
            raise ConfigError(f"sliding.keyframe_rule={self.sliding.keyframe_rule!r} must be distance or random")
        if self.sliding.chunk_weighting not in ("uniform", "propagated"):
            raise ConfigError(f"sliding.chunk_weighting={self.sliding.chunk_weighting!r} must be uniform or propagated")
