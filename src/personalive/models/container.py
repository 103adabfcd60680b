"""`PersonaLiveModels`: the seven networks of one PersonaLive (and the optional tiny decoder), held together (built and
loaded by `personalive.weights`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPVisionModelWithProjection

from personalive.models import cast_model
from personalive.models.denoising_unet import DenoisingUNet
from personalive.models.motion_encoder import MotionEncoder
from personalive.models.motion_extractor import MotionExtractor
from personalive.models.pose_guider import PoseGuider


@dataclass
class PersonaLiveModels:
    reference_unet: UNet2DConditionModel
    denoising_unet: DenoisingUNet
    pose_guider: PoseGuider
    motion_encoder: MotionEncoder
    motion_extractor: MotionExtractor
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    tiny_vae: AutoencoderTiny | None = None  # TAESD, loaded with vae_decoder=tiny

    def items(self):
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    @property
    def decoder(self) -> AutoencoderKL | AutoencoderTiny:
        """What decodes latents to frames: TAESD when loaded (vae_decoder=tiny), else the SD VAE (which always
        encodes the reference: the UNets work in its latent space)."""
        return self.vae if self.tiny_vae is None else self.tiny_vae

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PersonaLiveModels:
        for _, model in self.items():
            cast_model(model, device, dtype)
        return self

    def channels_last(self) -> PersonaLiveModels:
        """The convolution-heavy networks in channels-last memory (faster CPU convolutions; same numbers up to
        float rounding). Not the VAE: its decoder's output moves by 1.6e-5 of its range, over the official-fixture
        tolerance of 1e-5."""
        for net in ("denoising_unet", "reference_unet", "pose_guider", "motion_encoder"):
            getattr(self, net).to(memory_format=torch.channels_last)
        return self

    def eval(self) -> PersonaLiveModels:
        for _, model in self.items():
            model.eval().requires_grad_(False)
        return self
