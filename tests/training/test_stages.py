"""The three training stages at tiny size: a few steps with finite losses, overfitting one batch, what trains, the
output folder as inference weights, and the stage-1 start from the SD UNet."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import ROOT, one_thread, train_cfg, video_dir  # noqa: F401 (fixtures)

from personalive.config import TrainConfig, load_config
from personalive.errors import ConfigError, WeightsNotFoundError
from personalive.pipelines.stream import StreamEngine
from personalive.training.data import build_dataset
from personalive.training.loop import train
from personalive.training.losses import LPIPS, propagated_weights, snr_weights
from personalive.training.stages import (
    Randomness,
    build_stage,
    clip_frames,
    set_trainable,
    trainable_modules,
)
from personalive.weights import init_training_models, load_models


def lpips_files(folder):
    """Random LPIPS weights in the two official layouts (torchvision VGG16 + lpips linear layers)."""
    torch.manual_seed(0)
    state = LPIPS("vgg").state_dict()
    backbone = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.features.")}
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision file has a classifier: ignored
    linear = {k: v.abs() for k, v in state.items() if k.startswith("lin")}
    torch.save(backbone, folder / "vgg16.pth")
    torch.save(linear, folder / "vgg.pth")
    return [f"distill.lpips_backbone={folder / 'vgg16.pth'}", f"distill.lpips_linear={folder / 'vgg.pth'}"]


@pytest.fixture(scope="module")
def runs(tiny_weights, video_dir, tmp_path_factory):
    """The three tiny stages for 2 steps each, chained as in the README: stage 2 starts from stage 1's `final`,
    stage 3 from stage 2's (stage 1 asking for tensorboard, stage 2 with LPIPS, stage 3 with keyframe threshold 0:
    every frame that leaves the window is a keyframe, up to the cap)."""
    out, previous = {}, None
    for stage in (1, 2, 3):
        folder = tmp_path_factory.mktemp(f"stage{stage}")
        extra = {1: ["report_to=tensorboard"], 2: lpips_files(folder), 3: ["keyframe_threshold=0"]}[stage]
        cfg = train_cfg(stage, tiny_weights, video_dir, folder / "run", "max_train_steps=2", "checkpointing_steps=1",
                        "checkpoints_total_limit=1", *extra, init_from=previous)
        previous = train(cfg)
        metrics = [json.loads(line) for line in (folder / "run/metrics.jsonl").read_text().splitlines()]
        out[stage] = stage, previous, metrics
    return out


@pytest.fixture(params=[1, 2, 3])
def run(request, runs):
    return runs[request.param]


def test_each_stage_runs_with_finite_losses(run):
    stage, final, metrics = run
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    if stage == 2:
        assert all(m["lpips"] > 0 and 1 <= m["num_steps"] <= 4 for m in metrics)
    if stage == 3:  # threshold 0: each of the 3 rollout steps adds the frame that leaves, up to max_keyframes=3
        assert all(m["keyframes"] == 3 for m in metrics)
    checkpoints = sorted(p.name for p in final.parent.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]  # checkpoints_total_limit=1
    assert not list(final.parent.glob(".*partial"))


def test_tensorboard_logs_when_installed(runs):
    from accelerate.utils import is_tensorboard_available

    events = list((runs[1][1].parent / "logs").rglob("events.out.tfevents.*"))
    assert bool(events) == bool(is_tensorboard_available())  # else console + metrics.jsonl only, and no error


def test_output_is_a_weights_folder_the_engine_streams_with(run):
    _, final, _ = run
    names = sorted(p.name for p in (final / "personalive").iterdir())
    assert names == [f"{n}.pth" for n in ("denoising_unet", "motion_encoder", "motion_extractor", "pose_guider",
                                          "reference_unet", "temporal_module")]
    cfg = load_config(ROOT / "configs/prompts/tiny.yaml", [f"weights_dir={final}"])
    engine = StreamEngine(load_models(cfg), cfg)
    engine.fuse_reference(Image.fromarray(np.full((64, 64, 3), 120, np.uint8)))
    out = engine.step(torch.rand(4, 3, 64, 64) * 2 - 1)
    assert out.shape == (4, 64, 64, 3) and torch.isfinite(out).all()
    saved = load_config(final / "config.yaml", [], schema=TrainConfig)  # the resolved config, loadable as is
    assert saved.height == 64 and saved.stage == run[0]


def test_later_stages_start_from_the_previous_output_and_change_only_what_they_train(runs):
    def files(stage):
        return {p.stem: torch.load(p, weights_only=True) for p in (runs[stage][1] / "personalive").glob("*.pth")}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    one, two, three = files(1), files(2), files(3)
    changed = {name for name in one if not same(one[name], two[name])}
    assert changed == {"reference_unet", "denoising_unet"}  # stage 2's default trainable_modules
    changed = {name for name in two if not same(two[name], three[name])}
    assert changed == {"temporal_module"}  # stage 3: the temporal modules only


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_overfitting_one_batch_lowers_the_loss(stage, tiny_weights, video_dir, tmp_path):
    cfg = train_cfg(stage, tiny_weights, video_dir, tmp_path, "sliding.rollout_steps=1", "keyframe_threshold=1e9",
                    "distill.perceptual_weight=0")
    torch.manual_seed(0)
    models = init_training_models(cfg) if stage == 1 else load_models(cfg)
    net = build_stage(models, cfg)
    frames, contiguous = clip_frames(cfg)
    ds = build_dataset(cfg, frames, contiguous, models.image_encoder.config.image_size)
    batch = torch.utils.data.default_collate([ds[0]])
    lr = 1e-2 if stage == 3 else 1e-3  # stage 3 trains only the zero-initialised temporal output projections
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(6):
        loss = net(batch, Randomness.of(0, batch["key"], 0, torch.device("cpu")))["loss"]  # same noise every time
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_min_snr_weights_count_noisy_steps_as_noise_errors():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear")
    t = torch.tensor([0, 333, 999])
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)  # about [1175, 0.81, 0.0002]
    assert snr_weights(scheduler, t, None, "sample") is None
    torch.testing.assert_close(snr_weights(scheduler, t, 5.0, "sample"), torch.stack([torch.tensor(5.0), *snr[1:]]))
    torch.testing.assert_close(snr_weights(scheduler, t, 5.0, "noise"), torch.tensor([5 / snr[0], 1.0, 1.0]))


def test_propagated_weights_count_what_reaches_the_next_latent():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear")
    timesteps = torch.tensor([0, 333, 666, 999]).repeat_interleave(2)  # two-frame chunks, oldest first
    alpha = scheduler.alphas_cumprod
    expected = torch.stack([alpha[0], alpha[0], alpha[0], alpha[0], alpha[333], alpha[333], alpha[666], alpha[666]])
    torch.testing.assert_close(propagated_weights(scheduler, timesteps, 2), expected)
    assert expected[0] > 0.99 and 0.4 < expected[4] < 0.5 and 0.03 < expected[6] < 0.04  # output, t = 333, t = 666


def test_chunk_weighting_reweighs_stage_3_alone(tiny_weights, video_dir, tmp_path):
    cfg = train_cfg(3, tiny_weights, video_dir, tmp_path, "sliding.rollout_steps=1")
    net = build_stage(load_models(cfg), cfg)
    batch = torch.utils.data.default_collate([build_dataset(cfg, *clip_frames(cfg), 32)[0]])

    def loss(weighting):
        net.cfg.sliding.chunk_weighting = weighting
        with torch.no_grad():
            return net(batch, Randomness.of(0, batch["key"], 0, torch.device("cpu")))  # same noise every time

    uniform, propagated = loss("uniform"), loss("propagated")
    torch.testing.assert_close(propagated["l2"], uniform["loss"])  # same predictions
    assert propagated["loss"] < uniform["loss"]  # the pure-noise chunk counts 0.038 of its error
    with pytest.raises(ConfigError, match="chunk_weighting='snr'"):
        train_cfg(3, tiny_weights, video_dir, tmp_path, "sliding.chunk_weighting=snr")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_snr_gamma_weighs_each_stage_loss(stage, tiny_weights, video_dir, tmp_path):
    cfg = train_cfg(stage, tiny_weights, video_dir, tmp_path, "sliding.rollout_steps=1", "distill.perceptual_weight=0")
    models = init_training_models(cfg) if stage == 1 else load_models(cfg)
    net = build_stage(models, cfg)
    frames, contiguous = clip_frames(cfg)
    batch = torch.utils.data.default_collate([build_dataset(cfg, frames, contiguous, 32)[0]])

    def loss(gamma):
        net.cfg.snr_gamma = gamma
        with torch.no_grad():
            return net(batch, Randomness.of(0, batch["key"], 0, torch.device("cpu")))  # same noise every time

    plain = loss(None)
    if stage == 1:  # noise terms: every weight is 1 while gamma exceeds every SNR, < 1 when below every SNR
        torch.testing.assert_close(loss(1e6)["loss"], plain["loss"])
        assert 0 < loss(1e-4)["loss"] < plain["loss"]
        return
    weighted = loss(5.0)
    assert torch.isfinite(weighted["loss"]) and not torch.isclose(weighted["loss"], plain["loss"])
    torch.testing.assert_close(weighted["l2"], plain["loss"])  # same predictions; the plain error is still logged
    if stage == 3:  # the pure-noise chunk no longer dominates
        assert weighted["loss"] < plain["loss"]


def test_pixel_weight_adds_the_decoded_predictions_l1(tiny_weights, video_dir, tmp_path):
    cfg = train_cfg(2, tiny_weights, video_dir, tmp_path, "distill.perceptual_weight=0")
    net = build_stage(load_models(cfg), cfg)
    batch = torch.utils.data.default_collate([build_dataset(cfg, 1, False, 32)[0]])

    def loss(weight):
        net.cfg.distill.pixel_weight = weight
        with torch.no_grad():
            return net(batch, Randomness.of(0, batch["key"], 0, torch.device("cpu")))  # same noise every time

    plain, pixel = loss(0.0), loss(2.0)
    assert "pixel_l1" not in plain and 0 < pixel["pixel_l1"] < 1  # frames in [0, 1] units
    torch.testing.assert_close(pixel["loss"], plain["loss"] + 2 * pixel["pixel_l1"])
    net.cfg.snr_gamma = 5.0  # weighted as the L2 term: at this draw's timestep, by min(SNR, 5)
    weighted = loss(2.0)
    t = torch.tensor([cfg.timesteps[int(weighted["num_steps"]) - 1]])
    w = snr_weights(net.scheduler.ddim, t, 5.0, "sample")[0]
    torch.testing.assert_close(weighted["loss"], loss(0.0)["loss"] + 2 * w * weighted["pixel_l1"])


def test_driver_jitter_recolours_only_the_motion_encoders_face_crops(tiny_weights, video_dir, tmp_path):
    def batch(*overrides):
        cfg = train_cfg(1, tiny_weights, video_dir, tmp_path, *overrides)
        return cfg, torch.utils.data.default_collate([build_dataset(cfg, 2, False, 32)[3]])

    cfg, jittered = batch("data.driver_jitter=0.5")
    _, plain = batch()
    gain = jittered["driver_gain"][0]
    assert ((gain - 1).abs() > 0.02).any() and ((gain - 1).abs() <= 0.5).all() and plain["driver_gain"].eq(1).all()
    assert all(torch.equal(jittered[k], plain[k]) for k in plain if k != "driver_gain")  # the sample is the same
    net = build_stage(init_training_models(cfg), cfg)
    frames = jittered["frames"]
    faces, canvas = net.conditions(jittered, frames)
    faces0, canvas0 = net.conditions(plain, frames)
    assert torch.equal(canvas, canvas0)
    torch.testing.assert_close(faces, ((faces0 + 1) * gain[:, None, None, None] - 1).clamp(-1, 1))
    with pytest.raises(ConfigError, match="driver_jitter=1.5"):
        batch("data.driver_jitter=1.5")


def test_trainable_modules_select_what_trains(tiny_cfg, tiny_weights, video_dir, tmp_path):
    models = load_models(tiny_cfg)
    nets = set_trainable(models, ("temporal_module", "pose_guider"))
    assert set(nets) == {"denoising_unet", "pose_guider"}
    grads = {n for n, p in models.denoising_unet.named_parameters() if p.requires_grad}
    assert grads and all(".temporal_modules." in f".{n}" for n in grads)
    assert not any(p.requires_grad for p in models.reference_unet.parameters())
    assert not models.motion_encoder.training and models.pose_guider.training
    for bad in ("[motion_extractor]", "[not_a_network]", "[]"):
        cfg = train_cfg(1, tiny_weights, video_dir, tmp_path, f"trainable_modules={bad}")
        with pytest.raises(ConfigError, match="trainable_modules"):
            trainable_modules(cfg)


def test_stage1_starts_from_the_sd_unet(tiny_weights, video_dir, tmp_path):
    from personalive.io.checkpoints import find_weight_file, load_state_dict

    cfg = train_cfg(1, tiny_weights, video_dir, tmp_path)
    models = init_training_models(cfg)
    base = load_state_dict(find_weight_file(tiny_weights, "base_unet"))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(models.reference_unet.state_dict()[key], base[key])
    assert torch.equal(models.denoising_unet.state_dict()[key], base[key])
    proj_out = [v for k, v in models.denoising_unet.state_dict().items()
                if k.endswith("temporal_transformer.proj_out.weight")]
    assert proj_out and all(not v.any() for v in proj_out)  # new modules start as the identity


def test_bad_config_fails_before_any_work(tiny_weights, video_dir, tmp_path):
    with pytest.raises(ConfigError, match="snr_gamma=0"):
        train_cfg(1, tiny_weights, video_dir, tmp_path, "snr_gamma=0")
    with pytest.raises(ConfigError, match="ema_decay=1"):
        train_cfg(1, tiny_weights, video_dir, tmp_path, "ema_decay=1")
    with pytest.raises(ConfigError, match="train_batch_size=2: stage 3"):
        train_cfg(3, tiny_weights, video_dir, tmp_path, "train_batch_size=2")
    with pytest.raises(ConfigError, match="data_dir="):
        train(train_cfg(1, tiny_weights, tmp_path / "missing", tmp_path / "out"))
    with pytest.raises(WeightsNotFoundError, match="init_from="):
        train(train_cfg(2, tiny_weights, video_dir, tmp_path / "out", f"init_from={tmp_path / 'nothing'}"))


def test_ema_writes_the_moving_average_and_resume_restores_it(tiny_weights, video_dir, tmp_path):
    """diffusers' warm-up: the average is step 1's weights after step 1, then 2/11 of them plus 9/11 of step 2's.
    A run killed after checkpoint-1 and resumed writes the same average as one that was not."""
    from personalive.io.checkpoints import find_weight_file, load_state_dict

    def weights(folder):
        return load_state_dict(find_weight_file(folder, "denoising_unet"))

    steps = ("max_train_steps=2", "checkpointing_steps=1")
    raw = train(train_cfg(1, tiny_weights, video_dir, tmp_path / "raw", *steps))
    averaged = train(train_cfg(1, tiny_weights, video_dir, tmp_path / "ema", *steps, "ema_decay=0.9"))
    p1, p2 = weights(tmp_path / "raw/checkpoint-1"), weights(raw)
    e1, e2 = weights(tmp_path / "ema/checkpoint-1"), weights(averaged)
    moved = [k for k in p1 if not torch.equal(p1[k], p2[k])]
    assert moved
    for k in p1:
        torch.testing.assert_close(e1[k], p1[k])  # shadow - 1 * (shadow - p): p up to rounding
        torch.testing.assert_close(e2[k], 2 / 11 * p1[k] + 9 / 11 * p2[k], rtol=1e-5, atol=1e-7)

    for done in ("final", "checkpoint-2"):  # as if killed during step 2
        shutil.rmtree(tmp_path / "ema" / done)
    resumed = train(train_cfg(1, tiny_weights, video_dir, tmp_path / "ema", *steps, "ema_decay=0.9"))
    for k, v in weights(resumed).items():
        torch.testing.assert_close(v, e2[k], rtol=0, atol=0)


def test_stage3_rollout_is_the_streaming_step_without_its_decode(tiny_weights, video_dir, tmp_path, monkeypatch):
    cfg = train_cfg(3, tiny_weights, video_dir, tmp_path)
    net = build_stage(load_models(cfg), cfg)
    batch = torch.utils.data.default_collate([build_dataset(cfg, *clip_frames(cfg), 32)[0]])
    w, start = cfg.temporal_window_size, len(net.engine.timesteps) - cfg.temporal_window_size
    with torch.no_grad():
        clip, ref_latents = net.reference(batch)
        faces, canvas = net.conditions(batch, batch["frames"])
        motion, pose = net.motion_and_pose(faces[:, :, :start], canvas[:, :, :start])
        latents = torch.randn(1, 4, start, 8, 8, generator=torch.Generator().manual_seed(0))
        new = net.noisy_reference(ref_latents, w, 999, Randomness.of(0, batch["key"], 0, torch.device("cpu")))
        args = (latents, new, clip, motion, faces[:, :, start:start + w], pose, canvas[:, :, start:start + w])
        engine_out = net.engine.step_module(*args)
        rollout_out = net.rollout_step(*args)
    assert len(rollout_out) == len(engine_out) - 1  # all but the decoded frames
    for got, expected in zip(rollout_out, engine_out[1:], strict=True):
        assert torch.equal(got, expected.float() if got is rollout_out[0] else expected)

    calls = []
    decode = net.models.vae.decode
    monkeypatch.setattr(net.models.vae, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    out = net(batch, Randomness.of(0, batch["key"], 0, torch.device("cpu")))
    assert torch.isfinite(out["loss"]) and calls == []  # no VAE decode anywhere in a stage-3 step


def test_stage3_keyframes_follow_the_inference_distance_rule(tiny_weights, video_dir, tmp_path):
    cfg = train_cfg(3, tiny_weights, video_dir, tmp_path, "data.self_reference=1")  # the clip starts at it
    net = build_stage(load_models(cfg), cfg)
    batch = torch.utils.data.default_collate([build_dataset(cfg, *clip_frames(cfg), 32)[0]])
    rng = Randomness.of(0, batch["key"], 0, torch.device("cpu"))
    with torch.no_grad():
        bank = net.reference_motion(batch)  # (1, m * d)
        faces, _ = net.conditions(batch, batch["frames"])
        motion = net.models.motion_encoder(faces).flatten(2)[0]  # (L, m * d): every frame of the clip
    distances = torch.cdist(motion, bank)[:, 0]
    # the reference's tokens are cut and encoded as the frames' are: the clip's first frame is the reference itself
    assert bank.shape == (1, motion.shape[1]) and distances[0] < 1e-5 < distances[1:].min()

    def keyframes(*overrides):
        for override in overrides:
            key, value = override.split("=")
            obj = net.cfg.sliding if key.startswith("sliding.") else net.cfg
            setattr(obj, key.removeprefix("sliding."), type(getattr(obj, key.removeprefix("sliding.")))(value))
        with torch.no_grad():
            return int(net(batch, rng)["keyframes"])

    assert keyframes("keyframe_threshold=0") == cfg.max_keyframes == 3  # every leaving frame, up to the cap
    assert keyframes("keyframe_threshold=0", "max_keyframes=2") == 2
    net.bank.max_keyframes = 3
    assert keyframes("max_keyframes=3", f"keyframe_threshold={float(distances.max()) + 1}") == 0  # none is far
    assert keyframes("sliding.keyframe_rule=random", "sliding.keyframe_prob=1.0") == 1  # the option of before
    assert keyframes("sliding.keyframe_prob=0.0") == 0
    with pytest.raises(ConfigError, match="keyframe_rule='always'"):
        train_cfg(3, tiny_weights, video_dir, tmp_path, "sliding.keyframe_rule=always")
