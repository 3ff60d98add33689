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


def test_stage_clip_keeps_one_track_the_main_speaker(shared_data):
    """Several small faces on stage: every candidate track is scored, the documented rule
    picks exactly one, and it is the most present one; the extraction crops only it."""
    from msaflow.extractors.clip import ClipExtractor, ClipJob
    from msaflow.pipeline.extract import ExtractConfig

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

    cfg = ExtractConfig(fps=fps, detect_every=1, detect_scale=0.5)
    extractor = ClipExtractor(cfg, device="cpu")
    _, present = extractor._faces(reader, info, start, n, _scratch(), _NullTimer())
    expected = face.fill_track(chosen, n, max(1, round(cfg.fill_gap_s * fps)))[2]
    assert np.array_equal(present, expected)


def _scratch():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="msaflow-face-"))


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
