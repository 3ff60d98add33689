"""Face detection, the one-track rule and aligned crops, on real images and clips."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msaflow.extractors import face, video


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def detector():
    return face.FaceDetector(device="cpu", scale=1.0, min_size=20, min_prob=0.9)


def test_stage_clip_keeps_one_track_the_main_speaker(shared_data, tmp_path):
    """Several small faces on stage: every candidate track is scored, the documented rule
    picks exactly one, and it is the most present one; the extraction crops only it."""
    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.pipeline.extraction.settings import ExtractConfig

    path = shared_data / "raw/hamilton/short_hamilton_clip.mp4"
    start, end, fps = 7.8, 9.0, 5.0
    reader, info = video.open_video(path)
    n = video.n_output_frames(end - start, fps)
    idx = video.source_indices(info, start, n, fps)
    positions, frames = next(video.iter_frame_chunks(reader, idx, 64))
    det = face.FaceDetector(scale=0.5, min_size=20, min_prob=0.9)
    found = det.detect(frames, positions)
    assert max(len(f.boxes) for f in found) >= 3, "the stage segment shows several faces at once"
    tracks = face.link_tracks(found, iou_min=0.3, max_gap=3)
    assert len(tracks) >= 3
    chosen = face.choose_track(tracks, len(found))
    scores = [t.score(len(found)) for t in tracks]
    assert sum(t is chosen for t in tracks) == 1 and chosen is tracks[int(np.argmax(scores))]
    most_present = [t for t in tracks if len(t.frames) == max(len(u.frames) for u in tracks)]
    assert any(t is chosen for t in most_present), "the main track is the most present"
    area = lambda t: np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in t.boxes])  # noqa: E731
    assert area(chosen) == max(area(t) for t in most_present), "... and the largest of those"
    boxes = np.asarray(chosen.boxes)
    consecutive = face.iou_matrix(boxes[:-1], boxes[1:]).diagonal()
    assert consecutive.min() >= 0.3, "one consistent face over time"

    cfg = ExtractConfig(fps=fps, detect_every=1, detect_scale=0.5, min_face_size=20)
    extractor = ClipExtractor(cfg, device="cpu")
    _, present = extractor._faces(reader, info, start, n, tmp_path, _NullTimer())
    expected = face.fill_track(chosen, n, max(1, round(cfg.fill_gap_s * fps)))[2]
    assert np.array_equal(present, expected)


class _NullTimer:
    def __call__(self, stage):
        from contextlib import nullcontext

        return nullcontext()


def test_downscaled_detection_maps_boxes_back(shared_data, detector):
    reader, info = video.open_video(shared_data / "raw/grid/bbaf2n.mpg")
    frames = reader.get_batch([0, 40]).asnumpy()
    full = detector.detect(frames, np.array([0, 40]))
    half = face.FaceDetector(scale=0.5).detect(frames, np.array([0, 40]))
    for a, b in zip(full, half):
        assert len(a.boxes) == len(b.boxes) == 1
        assert face.iou_matrix(a.boxes, b.boxes)[0, 0] > 0.8
        assert np.abs(a.landmarks - b.landmarks).max() < 6  # pixels, full resolution


@pytest.mark.parametrize("roll", [-20.0, 15.0])
def test_crops_are_eye_aligned(shared_data, detector, roll):
    """Rotate a real portrait, crop it aligned: the eyes in the crop are level again."""
    photo = Image.open(shared_data / "faces/fr_obama.jpg").convert("RGB")
    photo = photo.resize((photo.width * 320 // photo.height, 320))  # keeps the test fast
    tilted = np.asarray(photo.rotate(roll, resample=Image.BILINEAR))[None]
    found = detector.detect(tilted, np.array([0]))[0]
    assert len(found.boxes) == 1
    assert abs(abs(face.angle_degrees(found.landmarks[0])) - abs(roll)) < 6
    aligned = face.crop_faces(tilted, found.boxes, found.landmarks, size=160, align=True)
    plain = face.crop_faces(tilted, found.boxes, found.landmarks, size=160, align=False)
    assert aligned.shape == (1, 160, 160, 3) and aligned.dtype == np.uint8
    again = detector.detect(aligned, np.array([0]))[0]
    assert len(again.boxes) == 1
    assert abs(face.angle_degrees(again.landmarks[0])) < 4
    still = detector.detect(plain, np.array([0]))[0]
    assert abs(face.angle_degrees(still.landmarks[0])) > 10


def _box(x, y, s=50.0):
    return np.array([x, y, x + s, y + s], float)


def _faces(frame, boxes, probs=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    probs = np.full(len(boxes), 0.99) if probs is None else np.asarray(probs, float)
    marks = np.zeros((len(boxes), 5, 2))
    marks[:, 0] = boxes[:, :2] + 10
    marks[:, 1] = boxes[:, :2] + [40, 10]
    return face.FrameFaces(frame, boxes, probs, marks)


def test_rule_prefers_present_large_confident_track():
    # a big face in 2 of 10 frames, a mid face in all 10, a small one in all 10
    dets = [_faces(f, [_box(10, 10, 60), _box(200, 10, 40)] + ([_box(100, 100, 120)] if f < 2 else []))
            for f in range(10)]
    tracks = face.link_tracks(dets, iou_min=0.3, max_gap=2)
    assert len(tracks) == 3
    chosen = face.choose_track(tracks, 10)
    assert np.allclose(chosen.boxes[0], _box(10, 10, 60))
    assert face.choose_track([], 10) is None


def test_gaps_are_interpolated_only_up_to_max_gap():
    track = face.Track()
    for f, x in [(0, 0.0), (4, 40.0), (20, 40.0)]:
        track.add(f, _box(x, 0), 0.99, np.zeros((5, 2)))
    boxes, _, present = face.fill_track(track, 25, max_gap=5)
    assert present[:5].all() and not present[5:20].any() and present[20] and not present[21:].any()
    assert np.allclose(boxes[2], _box(20.0, 0))


def test_detection_frames_include_the_last():
    assert face.detection_frames(11, 5).tolist() == [0, 5, 10]
    assert face.detection_frames(12, 5).tolist() == [0, 5, 10, 11]
    assert face.detection_frames(0, 5).tolist() == []


def test_refinement_detects_halfway_only_where_faces_disagree():
    steady = [_faces(0, [_box(10, 10)]), _faces(25, [_box(12, 11)]), _faces(50, [_box(14, 10)])]
    assert face.frames_to_refine(steady, np.arange(51), iou_min=0.6).size == 0
    moved = [_faces(0, [_box(10, 10)]), _faces(25, [_box(40, 10)])]  # IoU 0.25
    assert face.frames_to_refine(moved, np.arange(26), 0.6).tolist() == [12]
    gone = [_faces(0, [_box(10, 10)]), _faces(24, []), _faces(25, [])]
    assert face.frames_to_refine(gone, np.arange(26), 0.6).tolist() == [12]  # adjacent pair: nothing
    assert face.frames_to_refine(gone, np.array([0, 3, 24, 25]), 0.6).tolist() == [3]  # pictured only
    two = [_faces(0, [_box(10, 10), _box(200, 10)]), _faces(10, [_box(201, 10), _box(11, 10)])]
    assert face.frames_to_refine(two, np.arange(11), 0.6).size == 0  # matched regardless of order


def _blacked_out_after(src, dst, t: float):
    import subprocess

    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", str(src), "-vf",
                    f"drawbox=enable='gte(t,{t})':color=black:t=fill", "-c:v", "libx264", "-preset", "ultrafast",
                    "-c:a", "copy", str(dst)], check=True)
    return dst


def test_steady_clip_costs_keyframes_only_and_a_cut_is_found_to_the_frame(shared_data, tmp_path):
    """A steady GRID talking head: MTCNN runs on the 4 keyframes only. The same clip blacked
    out from 1.3 s: detection narrows down on the cut, so the face ends at frame 32 exactly
    (keyframes alone would stop at frame 25)."""
    from msaflow.extractors.clip import ClipExtractor
    from msaflow.pipeline.extraction.settings import ExtractConfig

    def run(path, **cfg):
        extractor = ClipExtractor(ExtractConfig(fps=25.0, detect_every=25, **cfg), device="cpu")
        seen = []
        detect = extractor.detector.detect
        extractor.detector.detect = lambda frames, ids: seen.extend(ids.tolist()) or detect(frames, ids)
        reader, info = video.open_video(path)
        n = video.n_output_frames(info.duration_s, 25.0)
        _, present = extractor._faces(reader, info, 0.0, n, tmp_path, _NullTimer())
        return sorted(seen), present

    grid = shared_data / "raw/grid/bbaf2n.mpg"
    seen, present = run(grid)
    assert seen == [0, 25, 50, 74] and present.all()
    cut = _blacked_out_after(grid, tmp_path / "cut.mp4", 1.3)  # frame 32 starts at 1.28 s
    seen, present = run(cut)
    assert present[:33].all() and not present[33:].any(), np.flatnonzero(present)
    assert len(seen) <= 4 + 6  # log2(25) halvings between keyframes 25 and 50
    _, keyframes_only = run(cut, refine_iou=0.0)
    assert keyframes_only[:26].all() and not keyframes_only[26:].any()


def test_cpu_and_gpu_crop_paths_agree(shared_data):
    """OpenCV (CPU) and grid_sample (GPU path, run here on CPU) cut the same crops, frame
    borders included."""
    reader, _ = video.open_video(shared_data / "raw/hdtf/hdtf_aoc.mp4")
    frames = reader.get_batch(list(range(0, 40, 2))).asnumpy()
    found = face.FaceDetector(scale=0.5).detect(frames[:1], np.array([0]))[0]
    rng = np.random.default_rng(0)
    boxes = found.boxes[:1] + rng.normal(0, 20, (20, 4))
    boxes[::3] -= 250  # partly outside the frame
    marks = found.landmarks[:1] + rng.normal(0, 5, (20, 5, 2))
    affine = face.crop_affines(boxes, marks, 96, 0.25, True)
    cpu = face.crop_faces(frames, boxes, marks, 96, 0.25, True, device="cpu")
    gpu_path = face._crop_grid_sample(frames, affine, 96, "cpu")
    assert cpu.shape == (20, 96, 96, 3) and np.abs(cpu.astype(int) - gpu_path.astype(int)).max() <= 1
    assert (cpu[::3] == 0).any(), "the boxes off the frame leave black borders"
