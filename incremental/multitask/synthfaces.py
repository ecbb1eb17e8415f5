"""SynthFaces: a deterministic generator of face-like images with nine attribute tasks.

Why a generator: the real use (face attributes on a low-power device) has no public data set with all
nine labels and nothing may be downloaded at run time. Every label is a known function of features
that are actually drawn, so each task is learnable, and the tasks differ the way real ones do:
landmarks and pose are in pixels and degrees (losses in the tens to hundreds), age in years (L1 in
the tens), attractiveness on a 1-10 scale, quality in [0, 1] (losses around 0.01), and four binary
tasks with cross-entropy around 0.7. That spread of loss scales is what the weighting must handle.

Tasks (``SYNTHFACES_TASKS``):
- ``landmarks``: 5 points (left eye, right eye, nose tip, left and right mouth corner), x, y in pixels;
- ``pose``: yaw, pitch, roll in degrees (marker -999: -1 degree is a real pose);
- ``smile``: mouth curved up and eyes narrowed (still visible in the eyes under a face mask);
- ``age``: 10-80 years: hair greying, forehead wrinkles, and less so face shape;
- ``gender``: face aspect ratio, hair length, beard shading (overlapping, so not trivial);
- ``mask``: a face mask over nose and mouth; ``glasses``: rings round the eyes and a bridge;
- ``attractiveness``: a fixed function of the drawn features (smile, age, face proportions, eye size,
  glasses), 1-10;
- ``quality``: ``1 - 0.5 * blur / max_blur - 0.5 * noise / max_noise`` of the blur and noise applied.

Drawing is vectorised over the batch in torch (soft-edged shapes from signed distances, a per-image
Gaussian blur as one grouped convolution), so a few thousand 64x64 images take about a second.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch.nn import functional as F

from ..data import Experience, TensorSamples
from .tasks import TaskSpec

SYNTHFACES_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("landmarks", "points", dim=10, loss="mse"),
    TaskSpec("pose", "regression", dim=3, loss="mse", marker=-999.0),
    TaskSpec("smile", "binary"),
    TaskSpec("age", "regression", loss="l1"),
    TaskSpec("gender", "binary"),
    TaskSpec("mask", "binary"),
    TaskSpec("glasses", "binary"),
    TaskSpec("attractiveness", "regression", loss="mse"),
    TaskSpec("quality", "regression", loss="mse"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in SYNTHFACES_TASKS)

MAX_BLUR = 1.6  # Gaussian sigma in pixels at 64x64 (scaled with the image size)
MAX_NOISE = 0.10  # std of additive Gaussian noise (images in [0, 1])


def draw_attributes(n: int, rng: np.random.Generator, image_size: int = 64) -> dict[str, np.ndarray]:
    """The latent features of ``n`` faces (float64 arrays of length n); labels and pixels follow."""
    s = image_size / 64.0
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    gender = (rng.random(n) < 0.5).astype(np.float64)  # 1 = female
    a = u(13.0, 16.5) * s
    aspect = np.where(gender > 0, u(1.22, 1.45), u(1.08, 1.32))
    age = u(10.0, 80.0)
    attrs = {
        "cx": 32.0 * s + u(-4, 4) * s,
        "cy": 33.0 * s + u(-3, 3) * s,
        "a": a,
        "b": a * aspect,
        "aspect": aspect,
        "yaw": u(-30, 30),
        "pitch": u(-20, 20),
        "roll": u(-25, 25),
        "gender": gender,
        "age": age,
        "smile": (rng.random(n) < 0.5).astype(np.float64),
        "mask": (rng.random(n) < 0.25).astype(np.float64),
        "glasses": (rng.random(n) < 0.35).astype(np.float64),
        "long_hair": np.where(gender > 0, rng.random(n) < 0.85, rng.random(n) < 0.12).astype(np.float64),
        "beard": np.where(gender > 0, 0.0, rng.random(n) < 0.4).astype(np.float64),
        "skin": u(0.0, 1.0),
        "hair_dark": u(0.05, 0.45),
        "grey": np.clip((age - 35.0) / 40.0 + rng.normal(0, 0.12, n), 0.0, 1.0),
        "eye_size": u(0.8, 1.2),
        "mouth_curve": u(0.7, 1.3),
        "bg1": rng.uniform(0.1, 0.9, (n, 3)),
        "bg2": rng.uniform(0.1, 0.9, (n, 3)),
        "bg_angle": u(0, 2 * math.pi),
        "blur": u(0.0, MAX_BLUR) * s,
        "noise": u(0.0, MAX_NOISE),
    }
    return attrs


def attractiveness_score(attrs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The fixed attractiveness function (1-10) of the drawn features; no noise, so it is learnable."""
    youth = np.exp(-(((attrs["age"] - 27.0) / 16.0) ** 2))
    proportion = np.clip(1.0 - np.abs(attrs["aspect"] - 1.27) / 0.15, 0.0, 1.0)
    eyes = (attrs["eye_size"] - 0.8) / 0.4
    score = 2.8 + 2.2 * attrs["smile"] + 2.0 * youth + 1.5 * proportion + 1.2 * eyes - 0.8 * attrs["glasses"]
    return np.clip(score, 1.0, 10.0)


def image_quality(attrs: Mapping[str, np.ndarray], image_size: int = 64) -> np.ndarray:
    """Quality in [0, 1]: 1 for a sharp clean image, 0 for maximum blur and maximum noise."""
    s = image_size / 64.0
    return 1.0 - 0.5 * attrs["blur"] / (MAX_BLUR * s) - 0.5 * attrs["noise"] / MAX_NOISE


def _feature_positions(attrs: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Face-local (u right, v down) centres of the features, after yaw and pitch (before roll)."""
    a, b = attrs["a"], attrs["b"]
    yaw, pitch = np.radians(attrs["yaw"]), np.radians(attrs["pitch"])
    du, dv = 0.45 * a * np.sin(yaw), 0.40 * b * np.sin(pitch)
    cy_, cp_ = np.cos(yaw), np.cos(pitch)
    eye_v = -0.20 * b * cp_ + dv
    mouth_v = 0.45 * b * cp_ + dv
    return {
        "eye_l": (-0.42 * a * cy_ + du, eye_v),
        "eye_r": (0.42 * a * cy_ + du, eye_v),
        "nose": (1.25 * du, 0.12 * b * cp_ + 1.1 * dv),
        "mouth_l": (-0.36 * a * cy_ + du, mouth_v),
        "mouth_r": (0.36 * a * cy_ + du, mouth_v),
    }


def landmarks(attrs: Mapping[str, np.ndarray]) -> np.ndarray:
    """(n, 10) image coordinates (x, y per point, pixels) of the five landmarks, in task order."""
    pos = _feature_positions(attrs)
    rho = np.radians(attrs["roll"])
    c, s_ = np.cos(rho), np.sin(rho)
    cols = []
    for key in ("eye_l", "eye_r", "nose", "mouth_l", "mouth_r"):
        u, v = pos[key]
        cols.append(attrs["cx"] + c * u - s_ * v)
        cols.append(attrs["cy"] + s_ * u + c * v)
    return np.stack(cols, axis=1)


def labels_from(attrs: Mapping[str, np.ndarray], image_size: int = 64) -> dict[str, torch.Tensor]:
    """The nine task labels (float32 tensors; binary tasks as 0/1)."""
    f = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    return {
        "landmarks": f(landmarks(attrs)),
        "pose": f(np.stack([attrs["yaw"], attrs["pitch"], attrs["roll"]], axis=1)),
        "smile": f(attrs["smile"]),
        "age": f(attrs["age"]),
        "gender": f(attrs["gender"]),
        "mask": f(attrs["mask"]),
        "glasses": f(attrs["glasses"]),
        "attractiveness": f(attractiveness_score(attrs)),
        "quality": f(image_quality(attrs, image_size)),
    }


# ------------------------------------------------------------------------------------- rendering
def _soft(signed_distance: torch.Tensor, edge: float = 0.6) -> torch.Tensor:
    """Coverage in [0, 1] from a signed distance in pixels (negative inside): anti-aliased edges."""
    return torch.sigmoid(-signed_distance / edge)


def _ellipse_sd(u: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, cv: torch.Tensor,
                ru: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (pixels) to an axis-aligned ellipse in face coordinates."""
    rad = torch.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 + 1e-12)
    return (rad - 1.0) * torch.minimum(ru, rv)


def _paint(img: torch.Tensor, alpha: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """Blend ``color`` (n, 3, 1, 1) over ``img`` (n, 3, H, W) with coverage ``alpha`` (n, H, W)."""
    a = alpha.unsqueeze(1)
    return img * (1.0 - a) + color * a


def _gaussian_blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma (n,) pixels) as one grouped separable convolution.

    torchvision's ``gaussian_blur`` takes one sigma per call; one grouped conv over the whole batch
    with a kernel per image avoids a Python loop over thousands of images.
    """
    n, c, h, w = img.shape
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    sig = sigma.clamp_min(1e-3).to(img.dtype).reshape(n, 1)
    k = torch.exp(-0.5 * (x.reshape(1, -1) / sig) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # sigma ~ 0 gives a delta kernel
    k = k.repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    flat = img.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, k.reshape(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, k.reshape(n * c, 1, -1, 1), groups=n * c)
    return flat.reshape(n, c, h, w)


def render(attrs: Mapping[str, np.ndarray], image_size: int = 64, noise_seed: int = 0,
           chunk: int = 512) -> torch.Tensor:
    """(n, 3, S, S) float32 images in [0, 1] of the faces described by ``attrs`` (deterministic)."""
    n = len(attrs["age"])
    out = torch.empty(n, 3, image_size, image_size)
    gen = torch.Generator().manual_seed(int(noise_seed))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        part = {k: v[sl] for k, v in attrs.items()}
        out[sl] = _render_chunk(part, image_size, gen)
    return out


def _render_chunk(attrs: Mapping[str, np.ndarray], size: int, gen: torch.Generator) -> torch.Tensor:
    t = lambda key: torch.as_tensor(attrs[key], dtype=torch.float32).reshape(-1, 1, 1)  # noqa: E731
    n = len(attrs["age"])
    s = size / 64.0
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    xs, ys = xs.unsqueeze(0), ys.unsqueeze(0)

    # background: linear gradient between two colours in a random direction
    ang = t("bg_angle")
    proj = ((xs - size / 2) * torch.cos(ang) + (ys - size / 2) * torch.sin(ang)) / size + 0.5
    bg1 = torch.as_tensor(attrs["bg1"], dtype=torch.float32).reshape(n, 3, 1, 1)
    bg2 = torch.as_tensor(attrs["bg2"], dtype=torch.float32).reshape(n, 3, 1, 1)
    img = bg1 + (bg2 - bg1) * proj.clamp(0, 1).unsqueeze(1)

    # face-local coordinates: undo the roll around the face centre
    cx, cy, rho = t("cx"), t("cy"), torch.deg2rad(t("roll"))
    c, sn = torch.cos(rho), torch.sin(rho)
    u = c * (xs - cx) + sn * (ys - cy)
    v = -sn * (xs - cx) + c * (ys - cy)
    a, b = t("a"), t("b")
    zero = torch.zeros_like(a)

    skin_t = t("skin")
    skin = (torch.tensor([0.96, 0.80, 0.68]).reshape(1, 3, 1, 1) * (1 - skin_t.unsqueeze(1))
            + torch.tensor([0.45, 0.30, 0.20]).reshape(1, 3, 1, 1) * skin_t.unsqueeze(1))
    grey = t("grey").unsqueeze(1)
    hair = t("hair_dark").unsqueeze(1) * torch.tensor([1.0, 0.75, 0.5]).reshape(1, 3, 1, 1)
    hair = hair * (1 - grey) + 0.85 * grey

    # long hair behind the face
    long_hair = t("long_hair")
    img = _paint(img, long_hair * _soft(_ellipse_sd(u, v, zero, 0.12 * b, 1.3 * a, 1.15 * b)), hair)
    # face
    face = _soft(_ellipse_sd(u, v, zero, zero, a, b))
    img = _paint(img, face, skin)
    # hair cap over the top of the head
    cap = _soft(_ellipse_sd(u, v, zero, -0.06 * b, 1.08 * a, 1.06 * b)) * _soft(v + 0.55 * b, 1.0)
    img = _paint(img, cap, hair)

    pos = {k: (torch.as_tensor(p[0], dtype=torch.float32).reshape(-1, 1, 1),
               torch.as_tensor(p[1], dtype=torch.float32).reshape(-1, 1, 1))
           for k, p in _feature_positions(attrs).items()}
    eye_v = pos["eye_l"][1]
    du = 0.45 * a * torch.sin(torch.deg2rad(t("yaw")))

    # forehead wrinkles: up to 3 lines, more and darker with age
    age = t("age")
    n_lines = ((age - 25.0) / 15.0).clamp(0, 3).floor()
    strength = ((age - 25.0) / 55.0).clamp(0, 1) * 0.6
    for i in range(3):
        line_v = eye_v - (0.17 + 0.07 * i) * b
        band = _soft((v - line_v).abs() - 0.45 * s, 0.35) * _soft((u - du).abs() - 0.38 * a, 0.8)
        img = _paint(img, band * face * strength * (n_lines > i).float(), skin * 0.55)

    # beard shading on the lower face
    beard = t("beard") * face * _soft(pos["mouth_l"][1] - 0.12 * b - v, 1.5) * 0.55
    img = _paint(img, beard, hair * 0.6 + 0.1)

    # eyes: narrower when smiling (visible under a face mask too)
    smile = t("smile")
    eye_h = 0.085 * b * t("eye_size") * (1.0 - 0.6 * smile)
    eye_w = 0.13 * a * t("eye_size")
    dark = torch.tensor([0.08, 0.08, 0.12]).reshape(1, 3, 1, 1)
    for key in ("eye_l", "eye_r"):
        eu, ev = pos[key]
        img = _paint(img, _soft(_ellipse_sd(u, v, eu, ev, eye_w, eye_h.clamp_min(0.6 * s))), dark)
    # nose
    nu, nv = pos["nose"]
    img = _paint(img, _soft(_ellipse_sd(u, v, nu, nv, 0.08 * a, 0.06 * b)) * 0.8, skin * 0.6)
    # mouth: a smile is an open crescent (teeth showing) whose centre hangs below the corners; no
    # smile is a closed, nearly straight line
    ml, mr = pos["mouth_l"], pos["mouth_r"]
    mu, mv = (ml[0] + mr[0]) / 2, ml[1]
    half_w = (mr[0] - ml[0]) / 2
    tt = ((u - mu) / half_w).clamp(-1.2, 1.2)
    inside_w = _soft((u - mu).abs() - half_w, 0.5)
    lip_color = torch.tensor([0.55, 0.12, 0.15]).reshape(1, 3, 1, 1)
    low = mv + 0.30 * b * t("mouth_curve") * (1 - tt**2)  # lower lip of the open smile
    high = mv + 0.04 * b * (1 - tt**2)  # upper lip
    crescent = _soft(high - v, 0.5) * _soft(v - low, 0.5) * inside_w * smile
    img = _paint(img, crescent, torch.tensor([0.25, 0.03, 0.06]).reshape(1, 3, 1, 1))
    teeth = _soft(high + 0.7 * s - v, 0.4) * _soft(v - high - 2.0 * s, 0.4) * inside_w * smile
    img = _paint(img, teeth, torch.tensor([0.97, 0.97, 0.93]).reshape(1, 3, 1, 1))
    flat = mv - 0.03 * b * t("mouth_curve") * (1 - tt**2)
    closed = _soft((v - flat).abs() - 0.7 * s, 0.4) * inside_w * (1 - smile)
    img = _paint(img, closed, lip_color)

    # face mask over nose and mouth
    fm = t("mask") * _soft(_ellipse_sd(u, v, zero, zero, 1.02 * a, 1.02 * b)) * _soft(nv - 0.05 * b - v, 0.7)
    img = _paint(img, fm, torch.tensor([0.62, 0.80, 0.95]).reshape(1, 3, 1, 1))

    # glasses: a ring round each eye and a bridge
    glasses = t("glasses")
    ring_w, ring_h = 0.24 * a, 0.17 * b
    for key in ("eye_l", "eye_r"):
        eu, ev = pos[key]
        ring = _soft(_ellipse_sd(u, v, eu, ev, ring_w, ring_h).abs() - 0.55 * s, 0.4)
        img = _paint(img, glasses * ring, dark)
    el, er = pos["eye_l"], pos["eye_r"]
    bridge = _soft((v - eye_v).abs() - 0.5 * s, 0.4) * _soft((u - (el[0] + er[0]) / 2).abs() - ((er[0] - el[0]) / 2 - ring_w), 0.4)
    img = _paint(img, glasses * bridge, dark)

    # camera: blur, then sensor noise
    img = _gaussian_blur(img, torch.as_tensor(attrs["blur"], dtype=torch.float32))
    noise = torch.randn(img.shape, generator=gen) * t("noise").unsqueeze(1)
    return (img + noise).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------- missing labels
def drop_labels(
    labels: Mapping[str, torch.Tensor],
    fraction: float | Mapping[str, float],
    markers: Mapping[str, float],
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Replace each task's label by its marker on ``round(fraction * n)`` samples drawn per task.

    Exactly that many (not a Bernoulli draw) so a configured 50% is 50%; independent across tasks.
    """
    out = {}
    for name, values in labels.items():
        p = fraction.get(name, 0.0) if isinstance(fraction, Mapping) else fraction
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"missing fraction for task {name!r} must be in [0, 1], got {p}")
        values = values.clone()
        k = int(round(p * len(values)))
        if k:
            idx = torch.as_tensor(rng.choice(len(values), size=k, replace=False), dtype=torch.long)
            values[idx] = float(markers.get(name, -1.0))
        out[name] = values
    return out


def make_synthfaces(
    n: int,
    seed: int,
    *,
    image_size: int = 64,
    missing_fraction: float | Mapping[str, float] = 0.0,
    markers: Mapping[str, float] | None = None,
) -> TensorSamples:
    """``n`` SynthFaces samples (x (n, 3, S, S), y = {task: labels}); same seed, same tensors.

    ``markers`` overrides the per-task missing markers of ``SYNTHFACES_TASKS``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    seq = np.random.SeedSequence([int(seed), 5])
    attr_seed, noise_seed, missing_seed = seq.spawn(3)
    attrs = draw_attributes(n, np.random.default_rng(attr_seed), image_size)
    x = render(attrs, image_size, noise_seed=int(noise_seed.generate_state(1)[0]))
    labels = labels_from(attrs, image_size)
    all_markers = {t.name: t.marker for t in SYNTHFACES_TASKS}
    all_markers.update(dict(markers or {}))
    unknown = sorted(set(all_markers) - set(TASK_NAMES))
    if unknown:
        raise ValueError(f"markers name unknown tasks {unknown}; SynthFaces tasks are {list(TASK_NAMES)}")
    labels = drop_labels(labels, missing_fraction, all_markers, np.random.default_rng(missing_seed))
    return TensorSamples(x, labels)


def synthfaces_tasks(markers: Mapping[str, float] | None = None) -> list[TaskSpec]:
    """The nine task specs, with markers overridden where given."""
    from dataclasses import replace

    markers = dict(markers or {})
    return [replace(t, marker=float(markers[t.name])) if t.name in markers else t for t in SYNTHFACES_TASKS]


def synthfaces_experiences(
    n_train: int, n_test: int, seed: int, *, image_size: int = 64,
    missing_fraction: float | Mapping[str, float] = 0.0, markers: Mapping[str, float] | None = None,
) -> tuple[Experience, Experience]:
    """A training experience (labels dropped as configured) and a fully labelled test experience,
    drawn from independent seeds derived from ``seed``."""
    train = make_synthfaces(n_train, seed * 2 + 1, image_size=image_size, missing_fraction=missing_fraction, markers=markers)
    test = make_synthfaces(n_test, seed * 2 + 2, image_size=image_size, markers=markers)
    return Experience(train, 0, [0]), Experience(test, 0, [0])
