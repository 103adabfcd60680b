"""Training data: sample shapes and determinism, data order, bad videos skipped by name, the keypoint cache."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_video
from synthetic import (  # noqa: F401 (fixtures)
    ROOT,
    face_frames,
    one_thread,
    train_cfg,
    video_dir,
    write_empty_video,
)

from personalive.errors import ConfigError, VideoReadError
from personalive.io.faces import mediapipe_available
from personalive.training.data import (
    EpochSampler,
    TalkingHeadDataset,
    VideoEntry,
    build_dataset,
    motion_input,
    pack_motion,
    scan_videos,
    warp_reference,
)
from personalive.weights import load_network


def run_prepare(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_items_have_documented_shapes_and_are_deterministic(tiny_weights, video_dir, tmp_path):
    cfg = train_cfg(1, tiny_weights, video_dir, tmp_path)
    ds = build_dataset(cfg, num_frames=2, contiguous=False, clip_size=32)
    assert len(ds) == 3
    item = ds[4]
    shapes = {k: tuple(v.shape) for k, v in item.items()}
    assert shapes == {"key": (), "ref_clip": (3, 32, 32), "ref_image": (3, 64, 64), "ref_pose": (3, 64, 64),
                      "frames": (2, 3, 64, 64), "cached": (), "ref_motion": (265,), "motion": (2, 265),
                      "face_boxes": (2, 4), "driver_gain": (3,)}
    assert -1 <= item["frames"].min() < item["frames"].max() <= 1
    assert 0 <= item["ref_pose"].min() and item["ref_pose"].max() <= 1
    assert int(item["key"]) == 4 and not item["cached"] and (item["face_boxes"] == -1).all()
    assert item["driver_gain"].eq(1).all()
    again = ds[4]
    assert all(torch.equal(item[k], again[k]) for k in item)  # a key is a sample
    assert not torch.equal(ds[7]["frames"], item["frames"])  # same video (7 % 3 == 4 % 3), other frames


def test_clips_are_consecutive_frames(tiny_weights, video_dir, tmp_path):
    cfg = train_cfg(3, tiny_weights, video_dir, tmp_path, "data.frame_stride=2")
    ds = build_dataset(cfg, num_frames=8, contiguous=True, clip_size=32)
    ref, targets = ds.frame_indices(ds.videos[0], 11)
    assert np.diff(targets).tolist() == [2] * 7 and targets[-1] < 32 and 0 <= ref < 32


@pytest.mark.parametrize("contiguous", [False, True])
def test_reference_gap_keeps_the_first_target_near_the_reference(contiguous):
    def samples(gap):
        ds = TalkingHeadDataset([], 8 if contiguous else 2, contiguous, (64, 64), (64, 64), 64, 32, 265, stride=2,
                                max_frames=90, reference_gap=gap)
        return [ds.frame_indices(VideoEntry(Path("clip.mp4"), 100), key) for key in range(300)]

    near = samples(3)
    assert all(abs(targets[0] - ref) <= 3 and 0 <= ref < 90 and 0 <= targets[0] and targets[-1] < 90
               for ref, targets in near)
    refs = [ref for ref, _ in near]
    assert min(refs) <= 2 and max(refs) >= 70  # references still cover the video
    far = samples(0)  # anywhere, with the targets of before
    assert max(abs(targets[0] - ref) for ref, targets in far) > 40
    assert [targets for _, targets in far] == [targets for _, targets in near]


def test_color_jitter_gives_reference_and_targets_one_gain(tiny_weights, video_dir, tmp_path):
    def item(*overrides):
        return build_dataset(train_cfg(1, tiny_weights, video_dir, tmp_path, *overrides), 2, False, 32)[5]

    plain, jittered = item(), item("data.color_jitter=0.3")
    assert torch.equal(jittered["frames"], item("data.color_jitter=0.3")["frames"])  # a key is still a sample

    def gain(name):  # per colour channel, of the [0, 1] values
        return ((jittered[name] + 1).sum(dim=(-1, -2)) / (plain[name] + 1).sum(dim=(-1, -2))).reshape(-1, 3)

    ref, targets = gain("ref_image"), gain("frames")
    assert ((ref - 1).abs() > 0.02).any() and ((ref - targets).abs() < 0.03).all(), (ref, targets)
    with pytest.raises(ConfigError, match="color_jitter=1.5"):
        item("data.color_jitter=1.5")


def test_hflip_mirrors_whole_samples(tiny_weights, video_dir, tmp_path):
    def items(*overrides):
        ds = build_dataset(train_cfg(1, tiny_weights, video_dir, tmp_path, *overrides), 2, False, 32)
        return [ds[key] for key in range(12)]

    plain, always, half = items(), items("data.hflip=1"), items("data.hflip=0.5")
    for p, a, h in zip(plain, always, half, strict=True):
        assert all(torch.equal(a[name], p[name].flip(-1)) for name in ("ref_image", "ref_pose", "frames"))
        assert torch.equal(h["frames"], a["frames"]) != torch.equal(h["frames"], p["frames"])  # one or the other
    assert 0 < sum(torch.equal(h["frames"], a["frames"]) for h, a in zip(half, always, strict=True)) < 12
    with pytest.raises(ConfigError, match="hflip=1.5"):
        items("data.hflip=1.5")


def test_self_reference_makes_the_first_target_the_reference():
    def samples(p):
        ds = TalkingHeadDataset([], 2, False, (64, 64), (64, 64), 64, 32, 265, reference_gap=4, self_reference=p)
        return [ds.frame_indices(VideoEntry(Path("clip.mp4"), 100), key) for key in range(200)]

    plain, always, half = samples(0), samples(1), samples(0.5)
    assert all(ref == targets[0] for ref, targets in always)
    assert [t for _, t in always] == [t for _, t in half] == [t for _, t in plain]  # the targets stay as drawn
    assert all(h in (p, a) for h, p, a in zip(half, plain, always, strict=True))
    assert 60 < sum(ref == targets[0] for ref, targets in half) < 140


def test_still_clip_makes_every_target_the_reference(tiny_weights, video_dir, tmp_path):
    def samples(p):
        ds = TalkingHeadDataset([], 4, True, (64, 64), (64, 64), 64, 32, 265, reference_gap=4, still_clip=p)
        return [ds.frame_indices(VideoEntry(Path("clip.mp4"), 100), key) for key in range(200)]

    plain, always, half = samples(0), samples(1), samples(0.5)
    assert all(targets == [ref] * 4 for ref, targets in always)
    assert [r for r, _ in always] == [r for r, _ in half] == [r for r, _ in plain]  # the references stay as drawn
    assert all(h in (p, a) for h, p, a in zip(half, plain, always, strict=True))
    assert 60 < sum(h == a for h, a in zip(half, always, strict=True)) < 140
    item = build_dataset(train_cfg(3, tiny_weights, video_dir, tmp_path, "data.still_clip=1"), 28, True, 32)[0]
    assert (item["frames"] == item["frames"][:1]).all()  # a streamed clip of one frame
    with pytest.raises(ConfigError, match="still_clip=2"):
        train_cfg(3, tiny_weights, video_dir, tmp_path, "data.still_clip=2")


def test_repeats_let_one_video_fill_a_batch(tiny_weights, video_dir, tmp_path):
    from personalive.training.loop import train

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(video_dir / "a.mp4", data / "a.mp4")
    ds = build_dataset(train_cfg(1, tiny_weights, data, tmp_path, "data.repeats=3"), 2, False, 32)
    items = [ds[key] for key in range(len(ds))]
    assert len(ds) == 3 and not torch.equal(items[0]["frames"], items[1]["frames"])  # one video, samples of their own
    with pytest.raises(ConfigError, match="train_batch_size=2 .* raise data.repeats"):
        train(train_cfg(1, tiny_weights, data, tmp_path / "one", "train_batch_size=2"))
    assert train(train_cfg(1, tiny_weights, data, tmp_path / "two", "train_batch_size=2", "data.repeats=2",
                           "max_train_steps=1")).is_dir()
    with pytest.raises(ConfigError, match="repeats=0"):
        train_cfg(1, tiny_weights, data, tmp_path, "data.repeats=0")


def test_reference_warp_moves_the_reference_alone(tiny_weights, video_dir, tmp_path):
    def item(*overrides):
        return build_dataset(train_cfg(1, tiny_weights, video_dir, tmp_path, *overrides), 2, False, 32)[5]

    plain, warped = item(), item("data.reference_warp=0.2")
    assert torch.equal(warped["frames"], plain["frames"]) and not warped["cached"]
    assert not torch.equal(warped["ref_image"], plain["ref_image"])
    assert torch.equal(warped["ref_image"], item("data.reference_warp=0.2")["ref_image"])  # a key is a sample
    with pytest.raises(ConfigError, match="reference_warp=0.7"):
        item("data.reference_warp=0.7")


def test_warp_reference_is_a_bounded_similarity():
    frame = np.zeros((60, 80, 3), np.uint8)
    frame[28:32, 38:42] = 255  # a dot at the centre (39.5, 29.5): only the shift moves it
    rng = np.random.default_rng(0)
    assert np.array_equal(warp_reference(frame, rng, 0.0), frame)
    for _ in range(20):
        ys, xs = np.nonzero(warp_reference(frame, rng, 0.1)[..., 0] > 127)
        assert abs(xs.mean() - 39.5) <= 0.1 * 80 + 0.5 and abs(ys.mean() - 29.5) <= 0.1 * 60 + 0.5


def test_data_order_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(5, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(5)) and first == list(EpochSampler(5, seed=3))
    sampler.set_epoch(2)
    second = list(sampler)
    assert sorted(second) == list(range(10, 15)) and [k - 10 for k in second] != first


@pytest.mark.parametrize("processes, batch, accumulation", [(2, 1, 1), (3, 2, 1), (2, 2, 3), (4, 1, 2)])
def test_processes_share_every_step_and_see_each_sample_once_per_epoch(processes, batch, accumulation):
    one = EpochSampler(29, seed=7, batch_size=batch * processes)  # one process, the same global batch
    one_acc = EpochSampler(29, seed=7, batch_size=batch, accumulation=processes)  # ... by accumulation
    shards = [EpochSampler(29, seed=7, batch_size=batch, num_processes=processes, process_index=p,
                           accumulation=accumulation) for p in range(processes)]
    for epoch in (0, 3):
        for s in (one, one_acc, *shards):
            s.set_epoch(epoch)
        keys = [list(s) for s in shards]
        assert all(len(k) == len(s) for k, s in zip(keys, shards, strict=True))
        seen = [k for shard in keys for k in shard]
        steps = 29 // (batch * processes * accumulation)
        assert len(seen) == len(set(seen)) == steps * batch * processes * accumulation  # each sample at most once
        assert all(epoch * 29 <= k < (epoch + 1) * 29 for k in seen)
        # micro-batch j of process p = samples [j * b * P + p * b, ... + b) of the order: what one process sees
        micro = [list(shard[j * batch:(j + 1) * batch]) for j in range(steps * accumulation) for shard in keys]
        flat = [k for m in micro for k in m]
        assert flat == list(one)[:len(flat)] == list(one_acc)[:len(flat)]


def test_a_resumed_epoch_starts_where_it_stopped_with_any_number_of_processes():
    whole = EpochSampler(24, seed=1, batch_size=4)
    whole.set_epoch(2)
    order = list(whole)
    for processes in (1, 2, 4):
        shards = [EpochSampler(24, seed=1, batch_size=4 // processes, num_processes=processes, process_index=p)
                  for p in range(processes)]
        for s in shards:
            s.set_epoch(2, start=8)  # two steps of 4 samples done
        rest = sorted(k for s in shards for k in s)
        assert rest == sorted(order[8:])
    odd = EpochSampler(24, seed=1, batch_size=3)  # a new step size: the tail too short for a step is left out
    odd.set_epoch(2, start=8)
    assert list(odd) == order[8:23] and odd.steps(8) == 5


def test_bad_videos_are_skipped_with_their_names(tiny_weights, video_dir, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(video_dir / "a.mp4", data / "good.mp4")
    (data / "corrupt.mp4").write_bytes(b"\x00\x01not a video" * 100)
    write_empty_video(data / "empty.mp4")
    write_video(data / "short.mp4", face_frames(6, seed=5))
    cfg = train_cfg(3, tiny_weights, data, tmp_path / "out")  # stage 3 clips need 28 frames
    with caplog.at_level(logging.WARNING):
        videos = scan_videos(cfg, min_frames=28)
    assert [v.path.name for v in videos] == ["good.mp4"]
    for name in ("corrupt.mp4", "empty.mp4", "short.mp4"):
        assert f"skipping {data / name}" in caplog.text


def test_a_video_failing_during_the_run_is_replaced(tiny_weights, video_dir, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(video_dir, data)
    cfg = train_cfg(1, tiny_weights, data, tmp_path / "out")
    ds = build_dataset(cfg, num_frames=1, contiguous=False, clip_size=32)
    (data / "a.mp4").write_bytes(b"broken after the scan")
    with caplog.at_level(logging.WARNING):
        item = ds[0]  # key 0 -> a.mp4, which now fails: the next video stands in
    assert f"skipping {data / 'a.mp4'}" in caplog.text and item["frames"].shape == (1, 3, 64, 64)


def test_no_usable_video_is_one_clear_error(tiny_weights, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(VideoReadError, match="no usable video"):
        scan_videos(train_cfg(1, tiny_weights, tmp_path / "data", tmp_path / "out"), 1)


def test_prepare_data_cache_equals_the_keypoints_of_training(tiny_weights, video_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(video_dir, data)
    config = str(ROOT / "configs/train/tiny_stage1.yaml")
    assert run_prepare(["--config", config, "--data_dir", str(data), f"weights_dir={tiny_weights}"]) == 0
    assert (data / ".personalive_cache/sub/c.mp4.npz").is_file()
    cfg = train_cfg(1, tiny_weights, data, tmp_path / "out")
    ds = build_dataset(cfg, num_frames=2, contiguous=False, clip_size=32)
    assert all(v.cache is not None for v in ds.videos)
    item = ds[1]
    assert item["cached"] and (item["face_boxes"] == -1).all()
    extractor = load_network(cfg, "motion_extractor")
    with torch.no_grad():
        fresh = pack_motion(extractor(motion_input(item["frames"], 64)))
    torch.testing.assert_close(item["motion"], fresh, rtol=1e-4, atol=1e-5)
    mirrored = build_dataset(train_cfg(1, tiny_weights, data, tmp_path / "out", "data.hflip=1"), 2, False, 32)[1]
    assert not mirrored["cached"] and (mirrored["motion"] == 0).all()  # the cache holds unmirrored keypoints
    # a changed video makes its cache stale: it is ignored, not trusted
    write_video(data / "a.mp4", face_frames(40, seed=9))
    assert [v.cache is None for v in scan_videos(cfg, 1)] == [True, False, False]


@pytest.mark.skipif(not mediapipe_available(), reason="mediapipe is not installed")
def test_prepare_data_with_mediapipe_records_a_faceless_video(tiny_weights, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    write_video(data / "blank.mp4", np.full((8, 64, 64, 3), 90, np.uint8))
    config = str(ROOT / "configs/train/tiny_stage1.yaml")
    with caplog.at_level(logging.WARNING):
        code = run_prepare(["--config", config, "--data_dir", str(data), "--detector", "mediapipe",
                            f"weights_dir={tiny_weights}"])
    assert code == 0 and f"skipping {data / 'blank.mp4'}: no face found" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(VideoReadError, match="no usable video"):
        scan_videos(train_cfg(1, tiny_weights, data, tmp_path / "out"), 1)
    assert f"skipping {data / 'blank.mp4'}: no face found" in caplog.text


@pytest.mark.slow
def test_ten_thousand_videos_are_indexed_without_decoding_and_a_bad_one_is_skipped(tiny_weights, video_dir, tmp_path,
                                                                                  monkeypatch, caplog):
    import os

    from personalive.io.video import VideoReader

    data = tmp_path / "many"
    for i in range(10_000):  # hard links of one small MP4: 10,000 files at no cost
        folder = data / f"{i // 1000}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(video_dir / "a.mp4", folder / f"{i:05d}.mp4")
    bad = data / "5" / "05000.mp4"
    bad.unlink()
    bad.write_bytes(b"\x00not a video" * 50)

    def no_decoding(self):
        raise AssertionError("indexing decoded a frame")

    monkeypatch.setattr(VideoReader, "__iter__", no_decoding)  # frame counts come from the container
    with caplog.at_level(logging.WARNING):
        videos = scan_videos(train_cfg(1, tiny_weights, data, tmp_path / "out"), min_frames=1)
    assert len(videos) == 9_999 and all(v.num_frames == 32 for v in videos)
    assert f"skipping {bad}" in caplog.text and caplog.text.count("skipping") == 1


def test_a_sample_failing_in_any_way_is_replaced_by_name(tiny_weights, video_dir, tmp_path, monkeypatch, caplog):
    cfg = train_cfg(1, tiny_weights, video_dir, tmp_path / "out")
    ds = build_dataset(cfg, num_frames=1, contiguous=False, clip_size=32)
    broken = ds.videos[0].path
    sample = TalkingHeadDataset._sample

    def fail_on_one(self, video, key):
        if video.path == broken:
            raise ValueError("a decoder error of a kind nobody expected")
        return sample(self, video, key)

    monkeypatch.setattr(TalkingHeadDataset, "_sample", fail_on_one)
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert f"skipping {broken}: ValueError: a decoder error" in caplog.text and item["frames"].shape == (1, 3, 64, 64)
