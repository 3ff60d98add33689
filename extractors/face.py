"""Faces: batched MTCNN detection, one face track per clip, eye-aligned square crops.

Detection runs on frames downscaled by `detect_scale` (boxes and landmarks are mapped
back to the decoded frames' resolution), first on every `detect_every`-th output frame that
shows a picture plus the first and last ones that do (the keyframes).

Track rule (the main speaker), over the detection frames in time order:
0. where two consecutive detection frames disagree (a different number of faces, or a face
   whose best match overlaps it less than `refine_iou`), also detect on the frame halfway,
   and again between the new neighbours, until neighbours agree or are adjacent. A steady
   talking head costs one detection per keyframe; motion, cuts and faces coming or going
   get dense detection where they happen;
1. keep detections with probability >= `min_prob` and both box sides >= `min_size` pixels;
2. link each detection to the track whose last box overlaps it most (Hungarian matching
   on IoU, IoU >= `iou_min`, track last seen at most `max_gap` frames earlier); an
   unmatched detection starts a new track;
3. score = mean box area x mean probability x (detection frames where the track is
   present / all detection frames); the highest score wins (ties: the earlier track);
4. between two detections of the winner at most `max_gap` frames apart, box and
   landmarks are interpolated linearly; every other frame has no face (mask false,
   crop zeros).

Crop: a square of side max(w, h) x (1 + margin) centered on the box, rotated so the two
eyes (MTCNN landmarks) are level, resampled bilinearly to `size` x `size` RGB uint8;
pixels outside the frame are black (OpenCV on CPU, grid_sample on a GPU: the same map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class FrameFaces:
    """Faces found in one output frame (full-resolution pixel coordinates)."""

    frame: int
    boxes: np.ndarray  # (k, 4) x1, y1, x2, y2
    probs: np.ndarray  # (k,)
    landmarks: np.ndarray  # (k, 5, 2): eyes (image left, right), nose, mouth corners


@dataclass(eq=False)  # a track is an identity, compared with `is`
class Track:
    frames: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    landmarks: list[np.ndarray] = field(default_factory=list)

    def add(self, frame: int, box: np.ndarray, prob: float, landmarks: np.ndarray) -> None:
        self.frames.append(frame)
        self.boxes.append(box)
        self.probs.append(prob)
        self.landmarks.append(landmarks)

    def score(self, n_detection_frames: int) -> float:
        boxes = np.asarray(self.boxes)
        area = float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        return area * float(np.mean(self.probs)) * len(self.frames) / max(1, n_detection_frames)


def faces_agree(a: FrameFaces, b: FrameFaces, iou_min: float) -> bool:
    """Same number of faces, each matched (Hungarian on IoU) to one overlapping it >= `iou_min`."""
    from scipy.optimize import linear_sum_assignment

    if len(a.boxes) != len(b.boxes):
        return False
    if len(a.boxes) == 0:
        return True
    iou = iou_matrix(a.boxes, b.boxes)
    rows, cols = linear_sum_assignment(-iou)
    return bool(np.all(iou[rows, cols] >= iou_min))


def frames_to_refine(found: list[FrameFaces], pictured: np.ndarray, iou_min: float) -> np.ndarray:
    """Frames halfway between consecutive detection frames whose faces disagree (rule step 0),
    chosen among `pictured` (output frames that show a picture); empty when all agree."""
    halfway = []
    for a, b in zip(found, found[1:]):
        if b.frame - a.frame > 1 and not faces_agree(a, b, iou_min):
            inside = pictured[(pictured > a.frame) & (pictured < b.frame)]
            if len(inside):
                halfway.append(inside[np.argmin(np.abs(inside - (a.frame + b.frame) / 2))])
    return np.asarray(halfway, np.int64)


def detection_frames(n_frames: int, every: int) -> np.ndarray:
    """Output frames to run the detector on: every `every`-th frame, and always the last."""
    if n_frames == 0:
        return np.zeros(0, np.int64)
    picked = np.arange(0, n_frames, every)
    return np.union1d(picked, [n_frames - 1]).astype(np.int64)


def keyframes(pictured: np.ndarray, n_frames: int, every: int) -> np.ndarray:
    """The keyframes among the output frames that show a picture (`pictured`, ascending):
    every `every`-th output frame that has one, and always the first and the last pictured
    frame, so that detection covers the clip's real pictures to their end even when the
    segment runs past the video's last frame (or starts before its first)."""
    if len(pictured) == 0:
        return np.zeros(0, np.int64)
    picked = np.intersect1d(detection_frames(n_frames, every), pictured)
    return np.union1d(picked, [pictured[0], pictured[-1]]).astype(np.int64)


class FaceDetector:
    """facenet-pytorch MTCNN on batches of frames (GPU when `device` is one)."""

    def __init__(self, device: str = "cpu", scale: float = 0.5, min_size: int = 20,
                 min_prob: float = 0.9, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 batch_size: int = 32):
        from facenet_pytorch import MTCNN

        self.device = torch.device(device)
        self.scale, self.min_size, self.min_prob = scale, min_size, min_prob
        self.batch_size = batch_size  # float copies of frames are made per batch: bounds memory
        self.mtcnn = MTCNN(keep_all=True, device=self.device, thresholds=list(thresholds),
                           min_face_size=max(12, int(round(min_size * scale))))
        # NHWC weights make every conv/pool of the three nets run channels-last: same boxes,
        # 1.4-1.7x faster detection on CPU (vectorized pooling)
        self.mtcnn.to(memory_format=torch.channels_last)

    def detect(self, frames: np.ndarray, frame_ids: np.ndarray, scale: float | None = None) -> list[FrameFaces]:
        """Faces in RGB uint8 frames (k, H, W, 3) of one clip, `batch_size` frames per MTCNN call.
        `scale`: downscale for MTCNN instead of the detector's own (frames decoded already
        downscaled are not shrunk again: see extractors/clip.py)."""
        found: list[FrameFaces] = []
        for lo in range(0, len(frames), self.batch_size):
            found += self._detect_batch(frames[lo:lo + self.batch_size], frame_ids[lo:lo + self.batch_size],
                                        self.scale if scale is None else scale)
        return found

    @torch.no_grad()
    def _detect_batch(self, frames: np.ndarray, frame_ids: np.ndarray, scale: float) -> list[FrameFaces]:
        from facenet_pytorch.models.utils.detect_face import detect_face

        m = self.mtcnn
        min_face = m.min_face_size if scale == self.scale else max(12, int(round(self.min_size * scale)))
        h, w = frames.shape[1:3]
        if math.floor(min(h, w) * scale) < min_face:  # MTCNN's pyramid is empty: no face of min_size fits
            return [FrameFaces(int(f), np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))) for f in frame_ids]
        batch = torch.from_numpy(np.require(frames, requirements="W")).to(self.device).permute(0, 3, 1, 2).float()
        if scale != 1.0:
            batch = F.interpolate(batch, scale_factor=scale, mode="bilinear", antialias=True,
                                  align_corners=False)
        boxes, points = detect_face(batch.permute(0, 2, 3, 1), min_face, m.pnet, m.rnet,
                                    m.onet, m.thresholds, m.factor, self.device)
        found = []
        for frame, b, p in zip(frame_ids, boxes, points):
            b = np.asarray(b, np.float64).reshape(-1, 5)
            p = np.asarray(p, np.float64).reshape(-1, 5, 2)
            box, prob, lm = b[:, :4] / scale, b[:, 4], p / scale
            keep = (prob >= self.min_prob) & (np.minimum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) >= self.min_size)
            found.append(FrameFaces(int(frame), box[keep], prob[keep], lm[keep]))
        return found


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (n, 4) and b (m, 4)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def link_tracks(detections: list[FrameFaces], iou_min: float = 0.3, max_gap: int = 12) -> list[Track]:
    """Tracks from per-frame detections (in frame order), rule steps 1-2 of the module doc."""
    from scipy.optimize import linear_sum_assignment

    tracks: list[Track] = []
    for faces in detections:
        if len(faces.boxes) == 0:
            continue
        alive = [t for t in tracks if faces.frame - t.frames[-1] <= max_gap]
        matched: set[int] = set()
        if alive:
            iou = iou_matrix(np.asarray([t.boxes[-1] for t in alive]), faces.boxes)
            rows, cols = linear_sum_assignment(-iou)
            for r, c in zip(rows, cols):
                if iou[r, c] >= iou_min:
                    alive[r].add(faces.frame, faces.boxes[c], float(faces.probs[c]), faces.landmarks[c])
                    matched.add(int(c))
        for c in range(len(faces.boxes)):
            if c not in matched:
                track = Track()
                track.add(faces.frame, faces.boxes[c], float(faces.probs[c]), faces.landmarks[c])
                tracks.append(track)
    return tracks


def choose_track(tracks: list[Track], n_detection_frames: int) -> Track | None:
    """The main speaker's track (rule step 3); None when no face was found."""
    if not tracks:
        return None
    scores = [t.score(n_detection_frames) for t in tracks]
    return tracks[int(np.argmax(scores))]  # argmax keeps the first of equal scores


def fill_track(track: Track | None, n_frames: int, max_gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output frame (boxes (n, 4), landmarks (n, 5, 2), present (n,)), rule step 4."""
    boxes = np.zeros((n_frames, 4))
    marks = np.zeros((n_frames, 5, 2))
    present = np.zeros(n_frames, bool)
    if track is None:
        return boxes, marks, present
    frames = np.asarray(track.frames)
    tb, tm = np.asarray(track.boxes), np.asarray(track.landmarks)
    boxes[frames], marks[frames], present[frames] = tb, tm, True
    for i in range(len(frames) - 1):
        a, b = frames[i], frames[i + 1]
        if 1 < b - a <= max_gap:
            w = ((np.arange(a + 1, b) - a) / (b - a))[:, None]
            boxes[a + 1:b] = (1 - w) * tb[i] + w * tb[i + 1]
            marks[a + 1:b] = ((1 - w) * tm[i].reshape(1, -1) + w * tm[i + 1].reshape(1, -1)).reshape(-1, 5, 2)
            present[a + 1:b] = True
    return boxes, marks, present


def crop_faces(frames: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, size: int = 112,
               margin: float = 0.25, align: bool = True, device: str = "cpu",
               batch_size: int = 32) -> np.ndarray:
    """Aligned square crops (k, size, size, 3) uint8 of frames (k, H, W, 3), one box each.

    The same affine map either way: on CPU OpenCV resamples each crop straight from the
    uint8 frame (no float copy of whole frames, ~0.07 ms a crop); on a GPU one batched
    grid_sample does.
    """
    affine = crop_affines(boxes, landmarks, size, margin, align)
    if torch.device(device).type == "cpu":
        return _crop_cv2(frames, affine, size)
    parts = [_crop_grid_sample(frames[lo:lo + batch_size], affine[lo:lo + batch_size], size, device)
             for lo in range(0, len(frames), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)


def crop_affines(boxes: np.ndarray, landmarks: np.ndarray, size: int, margin: float, align: bool) -> np.ndarray:
    """(k, 2, 3) maps from output pixel coordinates to frame pixel coordinates (both with pixel
    centres at i + 0.5): a square of side max(w, h) x (1 + margin) around the box centre,
    turned by the eye-line angle."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * (1 + margin)
    if align:
        angle = np.arctan2(landmarks[:, 1, 1] - landmarks[:, 0, 1], landmarks[:, 1, 0] - landmarks[:, 0, 0])
    else:
        angle = np.zeros(len(boxes))
    cos, sin, step = np.cos(angle), np.sin(angle), side / size
    # frame point = centre + R(angle) (p - size/2) * step, for output point p
    return np.stack([
        np.stack([cos * step, -sin * step, cx - (cos - sin) * side / 2], axis=1),
        np.stack([sin * step, cos * step, cy - (sin + cos) * side / 2], axis=1),
    ], axis=1)


def _crop_cv2(frames: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    import cv2

    # OpenCV puts pixel centres at integers: shift the map by half a pixel on both sides
    shifted = affine.copy()
    shifted[:, :, 2] += 0.5 * (affine[:, :, 0] + affine[:, :, 1]) - 0.5
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, (frame, m) in enumerate(zip(frames, shifted)):
        cv2.warpAffine(frame, m, (size, size), dst=out[i], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


@torch.no_grad()
def _crop_grid_sample(frames: np.ndarray, affine: np.ndarray, size: int, device) -> np.ndarray:
    k, height, width = frames.shape[:3]
    if k == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    # pixel maps -> grid_sample's normalized [-1, 1] coordinates (align_corners=False)
    to_norm = np.array([[2 / width, 0, -1], [0, 2 / height, -1], [0, 0, 1]])
    from_norm = np.array([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]])
    full = np.concatenate([affine, np.tile([[[0, 0, 1]]], (k, 1, 1))], axis=1)
    theta = (to_norm @ full @ from_norm)[:, :2]
    grid = F.affine_grid(torch.as_tensor(theta, dtype=torch.float32, device=device), [k, 3, size, size],
                         align_corners=False)
    images = torch.from_numpy(np.require(frames, requirements="W")).to(device).permute(0, 3, 1, 2).float()
    crops = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def angle_degrees(landmarks: np.ndarray) -> float:
    """Roll of the eye line of one landmark set, in degrees (for checks and reports)."""
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))
