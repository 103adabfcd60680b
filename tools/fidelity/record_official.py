"""Record the official implementation's numbers as test fixtures (tests/fixtures/official/official.npz).

Runs a checkout of GVCLab/PersonaLive that you supply (imported at run time, never copied here) on the CPU in fp32,
on random weights in the official layout, and stores what `tests/fidelity/` compares our code with:

- online: the official online wrapper (`src/wrapper.py`, `PersonaLive.process_input`) for 16 steps of 4 frames;
- offline: the official offline script (`inference_offline.py`, `main`) with the streaming pipeline on 44 frames;
- components on fixed inputs: CLIP embeddings, reference latents, motion-extractor outputs, retargeted keypoints,
  pose canvases, face boxes, motion tokens, PoseGuider features, one denoising-UNet output with reference and
  keyframe attention, one VAE decode.

Set-up (a scratch venv beside the project; the versions the fixtures were recorded with):

    python3 -m venv ../official-venv
    ../official-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 diffusers==0.27.0 transformers==4.36.2 \\
        huggingface-hub==0.25.1 accelerate==1.12.0 einops omegaconf numpy==1.26.4 mediapipe==0.10.21 \\
        opencv-python-headless==4.10.0.84 scikit-image==0.26.0 scikit-video==1.1.11 av==18.1.0 pillow==12.3.0 \\
        safetensors tqdm
    python tools/make_random_weights.py --size fidelity --seed 0 --out ../fidelity-weights   # project venv
    ../official-venv/bin/python tools/fidelity/record_official.py --official PersonaLive \\
        --weights ../fidelity-weights --out tests/fixtures/official/official.npz

The few patches the official code needs here, all applied at run time to the imported modules:
- the PoseGuider's output width follows the small UNet (the official code hard-codes SD's 320);
- the keyframe threshold (17 for trained motion tokens) is lowered for random weights (common.py);
- fresh noise comes per frame from `common.FrameNoise` instead of the global generator;
- the reference bank keeps the model's dtype (the official code rounds it to fp16 even in an fp32 run; ours does
  not: a documented difference);
- the offline pipeline's keyframe bank is bounded at 3 keyframes (officially, once the motion bank is full, the
  last keyframe decision is never reset and every later step adds one more keyframe: a documented bug fix);
- the offline script's decord reader is replaced by PyAV frames (decord is not needed) and its video writer by a
  function that keeps the frames in memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (tools/fidelity/common.py: shared with the tests)


class Recorder:
    """Patches the imported official modules and collects arrays under "<group>/<name>" keys."""

    def __init__(self, official: Path, weights: Path):
        self.official, self.weights = official, weights
        self.arrays: dict[str, np.ndarray] = {}
        self.noise = common.FrameNoise()
        self.distances: list[float] = []  # min motion distance of each keyframe test
        self.keypoints: list[torch.Tensor] = []  # every posed keypoint set drawn on a pose canvas, in call order
        sys.path.insert(0, str(official))
        unet = json.loads((weights / "sd-image-variations-diffusers/unet/config.json").read_text())
        self.pose_width = unet["block_out_channels"][0]
        self._patch()

    def put(self, key: str, value) -> None:
        self.arrays[key] = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)

    # ----------------------------------------------------------------------------------------------------------
    def _patch(self) -> None:
        import src.models.mutual_self_attention as msa
        import src.pipelines.pipeline_pose2vid as p2v
        import src.wrapper as wrapper
        from src.models.pose_guider import PoseGuider

        torch.randn_like = lambda x, **kwargs: self.noise(tuple(x.shape), x.dtype, x.device)
        wrapper.PoseGuider = functools.partial(PoseGuider, conditioning_embedding_channels=self.pose_width)
        self.pose_guider_cls = wrapper.PoseGuider
        for cls in (msa.ReferenceAttentionControl,):
            for name in ("update", "update_hkf"):
                original = getattr(cls, name)
                setattr(cls, name, functools.partialmethod(original, dtype=torch.float32))

        recorder = self

        def draw_keypoints(original):
            def draw(keypoints, *args, **kwargs):
                recorder.keypoints.append(keypoints.detach().float().cpu().clone())
                return original(keypoints, *args, **kwargs)
            return draw

        wrapper.draw_keypoints = draw_keypoints(wrapper.draw_keypoints)
        p2v.draw_keypoints = draw_keypoints(p2v.draw_keypoints)

        def threshold(original, limit):
            def calculate_dis(self, bank, new, threshold=None):
                flat_bank, flat_new = bank.view(bank.size(1), -1).float(), new.view(new.size(1), -1).float()
                recorder.distances.append(float(torch.cdist(flat_new[:1], flat_bank).min()))
                return original(self, bank, new, threshold=limit)
            return calculate_dis

        wrapper.PersonaLive.calculate_dis = threshold(wrapper.PersonaLive.calculate_dis, common.ONLINE_THRESHOLD)
        p2v.Pose2VideoPipeline_Stream.calculate_dis = threshold(p2v.Pose2VideoPipeline_Stream.calculate_dis,
                                                                common.OFFLINE_THRESHOLD)

    def _online_config(self, folder: Path) -> Path:
        w = self.weights
        config = {
            "batch_size": 1, "height": 512, "width": 512, "reference_image_height": 512,
            "reference_image_width": 512, "temporal_adaptive_step": 4, "temporal_window_size": 4,
            "num_inference_steps": 4, "dtype": "fp32", "fps": 16, "seed": 42,
            "vae_model_path": str(w / "sd-vae-ft-mse"),
            "image_encoder_path": str(w / "sd-image-variations-diffusers/image_encoder"),
            "pretrained_base_model_path": str(w / "sd-image-variations-diffusers"),
            "reference_unet_weight_path": str(w / "personalive/reference_unet.pth"),
            "denoising_unet_path": str(w / "personalive/denoising_unet.pth"),
            "pose_guider_path": str(w / "personalive/pose_guider.pth"),
            "motion_encoder_path": str(w / "personalive/motion_encoder.pth"),
            "temporal_module_path": str(w / "personalive/temporal_module.pth"),
            "pose_encoder_path": str(w / "personalive/motion_extractor.pth"),
            "inference_config": str(self.official / "configs/inference/inference_stage3.yaml"),
            # the offline script's names
            "vae_path": str(w / "sd-vae-ft-mse"), "weight_dtype": "fp32",
        }
        path = folder / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # ----------------------------------------------------------------------------------------------------------
    def online(self, config: Path) -> None:
        """The online wrapper, 16 steps; every output frame, the new motion tokens per step, keyframe steps."""
        from PIL import Image
        from src.wrapper import PersonaLive

        model = PersonaLive(SimpleNamespace(config_path=str(config)), device="cpu")
        frames = common.to_model(common.upsample(common.driving_clip(common.ONLINE_FRAMES)))
        tokens: list[torch.Tensor] = []
        model.motion_encoder.register_forward_hook(lambda m, i, out: tokens.append(out[0, -4:].clone()))
        self.noise.reset()
        self.distances.clear()
        self.keypoints.clear()
        model.fuse_reference(Image.open(common.reference_path()).convert("RGB"))
        outputs, keyframes = [], []
        for step in range(common.ONLINE_FRAMES // 4):
            before = model.num_khf
            outputs.append(model.process_input(frames[4 * step : 4 * step + 4]))
            if model.num_khf > before:
                keyframes.append(step)
        summary = common.frame_summary(np.concatenate(outputs))
        self.put("online/pixels", summary["pixels"])
        self.put("online/means", summary["means"])
        self.put("online/motion", torch.stack(tokens))  # (steps, 4, m, d)
        self.put("online/keyframe_steps", np.array(keyframes, dtype=np.int64))
        self.put("online/distances", np.array(self.distances, dtype=np.float32))
        self.put("online/keypoints", torch.cat(self.keypoints))  # (frames drawn, K, 3): the motion input's effect
        print(f"online: keyframes at steps {keyframes}; distances {np.round(self.distances, 3).tolist()}")
        self.components(model)

    def offline(self, config: Path, folder: Path) -> None:
        """The offline script's `main` with the streaming pipeline on the first 44 carphone frames."""
        import inference_offline as script

        script.PoseGuider = self.pose_guider_cls
        clip = common.driving_clip(common.CLIP_FRAMES)  # more than L: the script cuts the clip to L

        class Frames:  # decord.VideoReader's interface over the PyAV frames
            def __init__(self, path):
                self.frames = clip

            def __len__(self):
                return len(self.frames)

            def get_batch(self, index):
                return SimpleNamespace(asnumpy=lambda: self.frames[np.asarray(index).reshape(-1)])

        videos = []
        crops = []
        script.VideoReader = Frames
        script.save_videos_grid = lambda video, path, n_rows=6, **kw: videos.append((n_rows, video))
        original_crop = script.crop_face
        script.crop_face = lambda image, mesh: crops.append(original_crop(image, mesh)) or crops[-1]
        keyframe_steps: list[int] = []  # steps whose keyframe joined the bank
        self.noise.reset()
        self.distances.clear()
        self.keypoints.clear()
        args = SimpleNamespace(config=str(config), name="fidelity", W=512, H=512, L=common.OFFLINE_FRAMES, seed=42,
                               device="cpu", use_xformers=False, stream_gen=True,
                               reference_image=str(common.reference_path()), driving_video="driving.mp4")
        import src.models.mutual_self_attention as msa
        import src.pipelines.pipeline_pose2vid as p2v

        original_call, original_add = p2v.Pose2VideoPipeline_Stream.__call__, msa.ReferenceAttentionControl.update_hkf
        steps = [0]  # pose-guider calls: one per step

        def call(pipe, *a, **kw):
            pipe.pose_guider.register_forward_hook(lambda m, i, o: steps.__setitem__(0, steps[0] + 1))
            return original_call(pipe, *a, **kw)

        def bounded_add(reader, writer, **kw):  # the bounded bank: at most 3 keyframes (see the docstring)
            if len(keyframe_steps) < 3:
                keyframe_steps.append(steps[0] - 1)
                original_add(reader, writer, **kw)

        p2v.Pose2VideoPipeline_Stream.__call__ = call
        msa.ReferenceAttentionControl.update_hkf = bounded_add
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            script.main(args)
        finally:
            os.chdir(cwd)
        gen = next(video for rows, video in videos if rows == 1)  # (1, 3, f, H, W) in [0, 1]
        frames = gen[0].permute(1, 2, 3, 0).float()
        summary = common.frame_summary(frames)
        self.put("offline/pixels", summary["pixels"])
        self.put("offline/means", summary["means"])
        self.put("offline/keyframe_steps", np.array(keyframe_steps, dtype=np.int64))
        self.put("offline/distances", np.array(self.distances, dtype=np.float32))
        self.put("offline/keypoints", torch.cat(self.keypoints))
        self.put("offline/crop_sizes", np.array([c.shape[:2] for c in crops], dtype=np.int64))  # reference first
        print(f"offline: {frames.shape[0]} frames; keyframes at steps {keyframe_steps}; "
              f"distances {np.round(self.distances, 3).tolist()}")

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def components(self, model) -> None:
        """Each network on fixed inputs, with the online wrapper's models (after a reset)."""
        from PIL import Image
        from src.utils.util import draw_keypoints, get_boxes

        model.reset()
        reference = Image.open(common.reference_path()).convert("RGB")
        pixels = model.clip_image_processor.preprocess(reference, return_tensors="pt").pixel_values
        self.put("components/clip_online", model.image_encoder(pixels).image_embeds)
        squashed = model.clip_image_processor.preprocess(reference.resize((224, 224)), return_tensors="pt")
        self.put("components/clip_offline", model.image_encoder(squashed.pixel_values).image_embeds)
        self.noise.reset()
        model.fuse_reference(reference)
        self.put("components/ref_latents", model.ref_image_latents)

        frames = common.to_model(common.upsample(common.driving_clip(8)))
        motion_input = model.fast_resize(frames, 256, 256) / 2 + 0.5
        raw = model.pose_encoder.detector(torch.cat([model.ref_cond_tensor, motion_input[:4]]))
        for key, value in raw.items():
            self.put(f"components/extractor_{key}", value)
        ramp, kps_ref, kps_first, kps_drv = model.pose_encoder.interpolate_kps_online(
            model.ref_cond_tensor, motion_input[:4], num_interp=13)
        later, kps_later = model.pose_encoder.get_kps(kps_ref, kps_first, motion_input[4:])
        self.put("components/keypoints_start", ramp)  # (16, 21, 3): 12 ramp sets, then frames 0-3
        self.put("components/keypoints_later", later)  # frames 4-7
        self.put("components/boxes", get_boxes(torch.cat([kps_drv, kps_later])))
        canvas = draw_keypoints(torch.cat([ramp, later]), device="cpu")  # (20, 3, 512, 512)
        self.put("components/canvas", torch.round(canvas * 255).to(torch.uint8))

        faces = common.seeded((1, 3, 4, 224, 224), 11).clamp(-1, 1)
        self.put("components/motion_tokens", model.motion_encoder(faces))
        pose = model.pose_guider(canvas[:4].permute(1, 0, 2, 3).unsqueeze(0))  # (1, c, 4, 64, 64)
        self.put("components/pose_features", pose[..., ::4, ::4])

        clip = model.encoder_hidden_states
        model.reference_control_writer.clear()
        model.reference_unet(common.seeded((1, 4, 64, 64), 12), torch.zeros(1), encoder_hidden_states=clip,
                             return_dict=False)
        model.reference_control_reader.update_hkf(model.reference_control_writer)
        timesteps = torch.tensor([0, 333, 666, 999]).repeat_interleave(4)
        eps = model.denoising_unet(common.seeded((1, 4, 16, 64, 64), 13), timesteps,
                                   encoder_hidden_states=[clip, common.seeded((1, 16, 32, 16), 14)],
                                   pose_cond_fea=common.seeded((1, self.pose_width, 16, 64, 64), 15),
                                   return_dict=False)[0]
        self.put("components/unet_eps", eps[..., ::4, ::4])
        self.put("components/unet_eps_mean", eps.mean(dim=(3, 4)))
        decoded = model.vae.decode(common.seeded((1, 4, 64, 64), 16)).sample  # (1, 3, 512, 512) in about [-1, 1]
        summary = common.frame_summary((decoded / 2 + 0.5).permute(0, 2, 3, 1))
        self.put("components/vae_pixels", summary["pixels"])
        self.put("components/vae_means", summary["means"])


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("torch", "torchvision", "diffusers", "transformers", "numpy", "pillow", "av", "mediapipe")
    return {name: md.version(name) for name in names}


def official_commit(official: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of GVCLab/PersonaLive")
    parser.add_argument("--weights", type=Path, required=True,
                        help="random weights: tools/make_random_weights.py --size fidelity --seed 0 --out DIR")
    parser.add_argument("--out", type=Path, default=common.FIXTURE)
    parser.add_argument("--commit", help="the checkout's commit, when it is not a git work tree")
    parser.add_argument("--only", choices=("online", "offline"), help="record one stream (and keep the other's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    official, weights = args.official.resolve(), args.weights.resolve()
    recorder = Recorder(official, weights)
    meta = {"official_commit": official_commit(official, args.commit), "versions": versions(),
            "weights_hash": common.weights_hash(weights), "weights_seed": common.WEIGHTS_SEED,
            "noise_seed": common.NOISE_SEED, "online_threshold": common.ONLINE_THRESHOLD,
            "offline_threshold": common.OFFLINE_THRESHOLD,
            "reference_hash": common.array_hash(np.asarray(__import__("PIL.Image").Image.open(
                common.reference_path()).convert("RGB"))),
            "driving_hash": common.array_hash(common.driving_clip(common.CLIP_FRAMES))}
    if args.only and args.out.exists():
        with np.load(args.out) as old:
            recorder.arrays.update({k: old[k] for k in old.files if not k.startswith(f"{args.only}/") and k != "meta"})
    with tempfile.TemporaryDirectory() as tmp:
        config = recorder._online_config(Path(tmp))
        if args.only in (None, "online"):
            recorder.online(config)
        if args.only in (None, "offline"):
            recorder.offline(config, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial.npz")
    np.savez_compressed(partial, meta=np.array(json.dumps(meta)), **recorder.arrays)
    os.replace(partial, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
