"""Embedded synthetic indoor scenes: the default data set, deterministic from (seed, split, index).

A pinhole camera in a room (floor, walls, ceiling, pictures on the walls) with boxes, spheres and,
often, a standing figure made of a head, torso, arms and legs. Rays are cast with numpy over all
pixels at once; every label comes from the same hit record, so the tasks agree exactly:
depth (z-distance) and normals (camera frame: x right, y up, z towards the camera) from geometry,
semseg from the object type, edges where object, class, depth or normal change, the figure's parts as
`human_parts` (all 255 when no figure is visible, as PASCAL images without people), and the salient
object (`sal`) = the figure if visible, else the largest visible box or sphere. The image is shaded
from the geometry (Lambert point light + ambient), with procedural textures and noise.
"""
import math

import numpy as np
from torch.utils.data import Dataset

from .base import check_tasks, to_sample

CLASSES = ("floor", "wall", "ceiling", "picture", "box", "sphere", "figure")
FLOOR, WALL, CEILING, PICTURE, BOX, SPHERE, FIGURE = range(len(CLASSES))
TASKS = ("semseg", "depth", "normals", "edge", "human_parts", "sal")
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
LENGTHS = {"train": 2000, "val": 250, "test": 250}

# part label, box half-extents or sphere radius, centre (x, y, z) of a 1.7 m figure, +x = its left
_FIGURE = (
    (1, "sphere", 0.115, (0.0, 1.58, 0.0)),            # head
    (2, "box", (0.05, 0.05, 0.05), (0.0, 1.44, 0.0)),    # neck
    (2, "box", (0.19, 0.28, 0.11), (0.0, 1.13, 0.0)),    # torso
    (5, "box", (0.075, 0.21, 0.075), (0.1, 0.64, 0.0)),  # upper legs
    (5, "box", (0.075, 0.21, 0.075), (-0.1, 0.64, 0.0)),
    (6, "box", (0.065, 0.215, 0.07), (0.1, 0.215, 0.0)),  # lower legs and feet
    (6, "box", (0.065, 0.215, 0.07), (-0.1, 0.215, 0.0)),
    (3, "box", (0.05, 0.15, 0.055), (0.25, 1.24, 0.0)),   # upper arms
    (3, "box", (0.05, 0.15, 0.055), (-0.25, 1.24, 0.0)),
)
# lower arms: hanging down, or held forwards
_ARM_DOWN = ((0.045, 0.15, 0.05), (0.0, 0.94, 0.0))
_ARM_FWD = ((0.045, 0.045, 0.15), (0.0, 1.08, 0.15))
_EPS = 1e-4


def _rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], np.float32)


class _Hits:
    """Nearest hit so far per ray: distance, world normal, class, object id, figure part, texture id."""

    def __init__(self, n):
        self.t = np.full(n, np.inf, np.float32)
        self.normal = np.zeros((n, 3), np.float32)
        self.cls = np.zeros(n, np.int64)
        self.obj = np.zeros(n, np.int64)
        self.part = np.zeros(n, np.int64)

    def take(self, idx, t, normal, cls, obj, part=0):
        closer = t < self.t[idx]
        i = idx[closer]
        self.t[i] = t[closer]
        self.normal[i] = normal[closer] if normal.ndim == 2 else normal
        self.cls[i], self.obj[i], self.part[i] = cls, obj, part


def _box_hit(o, d, centre, half, rot):
    """Ray / box (rotated about y by `rot`) intersections: (hit mask, t, world normals of the hits)."""
    r = _rot_y(rot)
    ol = (o - centre) @ r            # world -> box frame (r is orthonormal; row vector @ r = r^T v)
    dl = d @ r
    dl[np.abs(dl) < 1e-9] = 1e-9
    inv = 1.0 / dl
    t1 = (-half - ol) * inv
    t2 = (half - ol) * inv
    tnear = np.minimum(t1, t2)
    tfar = np.maximum(t1, t2)
    # column-wise max/min: much faster than reductions over a length-3 axis
    tmin = np.maximum(np.maximum(tnear[:, 0], tnear[:, 1]), tnear[:, 2])
    tmax = np.minimum(np.minimum(tfar[:, 0], tfar[:, 1]), tfar[:, 2])
    hit = (tmax >= tmin) & (tmin > _EPS)
    axis = tnear[hit].argmax(1)
    nl = np.zeros((len(axis), 3), np.float32)
    nl[np.arange(len(axis)), axis] = -np.sign(dl[hit, axis])
    return hit, tmin[hit], nl @ r.T


def _near(o, d, centre, radius):
    """Indices of the rays that pass within `radius` of `centre` (a cheap cull before exact tests)."""
    oc = centre - o
    b = d @ oc
    return np.flatnonzero((b > 0) & (float(oc @ oc) - b * b < radius * radius))


def _sphere_hit(o, d, centre, radius):
    oc = o - centre
    b = d @ oc
    disc = b * b - float(oc @ oc - radius * radius)
    hit = disc > 0
    t = -b[hit] - np.sqrt(disc[hit])
    keep = t > _EPS
    hit[np.flatnonzero(hit)[~keep]] = False
    t = t[keep]
    p = o + d[hit] * t[:, None]
    return hit, t, (p - centre) / radius


def _sample_scene(rng):
    """Room, camera, light and objects, all drawn from `rng`."""
    room = np.array([rng.uniform(2.0, 3.5), rng.uniform(2.5, 3.2), rng.uniform(2.5, 4.0)], np.float32)
    lo = np.array([-room[0], 0.0, -room[2]], np.float32)
    hi = np.array([room[0], room[1], room[2]], np.float32)
    cam = np.array([rng.uniform(-0.5, 0.5) * room[0], rng.uniform(1.2, 1.7), room[2] * rng.uniform(0.55, 0.85)],
                   np.float32)
    yaw, pitch = rng.uniform(-0.45, 0.45), rng.uniform(-0.35, 0.0)
    fov = math.radians(rng.uniform(55, 70))
    fwd = np.array([-math.sin(yaw) * math.cos(pitch), math.sin(pitch), -math.cos(yaw) * math.cos(pitch)],
                   np.float32)
    light = np.array([rng.uniform(-0.6, 0.6) * room[0], room[1] - 0.2, rng.uniform(-0.6, 0.6) * room[2]],
                     np.float32)

    def floor_spot(min_dist=0.9, radius=0.3):
        # a place on the floor roughly in view, inside the room, away from the camera
        for _ in range(20):
            a = yaw + rng.uniform(-0.5, 0.5) * fov
            dist = rng.uniform(min_dist + radius, 2 * room[2])
            x, z = cam[0] - math.sin(a) * dist, cam[2] - math.cos(a) * dist
            if abs(x) < room[0] - radius and abs(z) < room[2] - radius:
                return x, z
        return 0.0, -0.5 * room[2]

    boxes, spheres = [], []
    for _ in range(rng.integers(2, 6)):
        half = rng.uniform([0.15, 0.15, 0.15], [0.6, 0.6, 0.5]).astype(np.float32)
        x, z = floor_spot(radius=float(half.max()) * 1.5)
        boxes.append((np.array([x, half[1], z], np.float32), half, rng.uniform(0, math.pi)))
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(0.12, 0.4)
        if boxes and rng.random() < 0.4:   # on top of a box
            c, half, _ = boxes[rng.integers(len(boxes))]
            spheres.append((np.array([c[0], 2 * half[1] + r, c[2]], np.float32), r))
        else:
            x, z = floor_spot(radius=r)
            spheres.append((np.array([x, r, z], np.float32), r))
    figure = None
    if rng.random() < 0.65:
        x, z = floor_spot(min_dist=1.2, radius=0.4)
        figure = (np.array([x, 0.0, z], np.float32), rng.uniform(0.85, 1.1), rng.uniform(-math.pi, math.pi),
                  (rng.random() < 0.4, rng.random() < 0.4))
    pictures = []
    for _ in range(rng.integers(0, 4)):
        wall = rng.integers(4)  # which of -z, +x, -x walls (and +z behind the camera, rarely seen)
        w, h = rng.uniform(0.3, 0.9), rng.uniform(0.25, 0.6)
        u, v = rng.uniform(-1, 1) * 0.7, rng.uniform(1.0, room[1] - 0.5)
        pictures.append((wall, u, v, w, h))
    return dict(lo=lo, hi=hi, cam=cam, fwd=fwd, fov=fov, light=light, boxes=boxes, spheres=spheres,
                figure=figure, pictures=pictures)


def _camera_rays(scene, h, w):
    fwd = scene["fwd"]
    right = np.cross(fwd, np.array([0, 1, 0], np.float32))
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    f = (w / 2) / math.tan(scene["fov"] / 2)
    xs = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / f
    ys = (h / 2 - np.arange(h, dtype=np.float32) - 0.5) / f
    d = fwd[None, None] + xs[None, :, None] * right + ys[:, None, None] * up
    d = d.reshape(-1, 3)
    d /= np.sqrt(np.einsum("ij,ij->i", d, d))[:, None]
    return d, np.stack([right, up, -fwd])   # rows: camera x, y, z axes in world coordinates


def _cast(scene, d):
    o, lo, hi = scene["cam"], scene["lo"], scene["hi"]
    n = len(d)
    hits = _Hits(n)
    every = np.arange(n)
    # room, seen from inside: the nearest exit through the six planes
    dd = np.where(np.abs(d) < 1e-9, 1e-9, d)
    t_axes = (np.where(dd > 0, hi, lo) - o) / dd
    axis = t_axes.argmin(1)
    t_room = t_axes[every, axis]
    normal = np.zeros((n, 3), np.float32)
    normal[every, axis] = -np.sign(dd[every, axis])
    cls = np.where(axis == 1, np.where(d[:, 1] < 0, FLOOR, CEILING), WALL)
    hits.t[:] = t_room
    hits.normal[:] = normal
    hits.cls[:] = cls
    # object ids: 0 floor, 1 ceiling, 2..5 walls (-x, +x, -z, +z), then objects
    hits.obj[:] = np.where(axis == 1, np.where(d[:, 1] < 0, 0, 1), 2 + 2 * (axis // 2) + (dd[every, axis] > 0))
    p = o + d * t_room[:, None]
    for k, (wall, u, v, w, hh) in enumerate(scene["pictures"]):
        obj = [4, 3, 2, 5][wall]   # -z, +x, -x, +z walls
        along = p[:, 0] / hi[0] if obj in (4, 5) else p[:, 2] / hi[2]
        span = w / (2 * hi[0]) if obj in (4, 5) else w / (2 * hi[2])
        on = (hits.obj == obj) & (np.abs(along - u) < span) & (np.abs(p[:, 1] - v) < hh / 2)
        hits.cls[on] = PICTURE
        hits.obj[on] = 100 + k
    next_id = 6
    for centre, half, rot in scene["boxes"]:
        idx = _near(o, d, centre, float(np.linalg.norm(half)))
        hit, t, nrm = _box_hit(o, d[idx], centre, half, rot)
        hits.take(idx[hit], t, nrm, BOX, next_id)
        next_id += 1
    for centre, r in scene["spheres"]:
        idx = _near(o, d, centre, r)
        hit, t, nrm = _sphere_hit(o, d[idx], centre, r)
        hits.take(idx[hit], t, nrm, SPHERE, next_id)
        next_id += 1
    if scene["figure"] is not None:
        _cast_figure(scene["figure"], o, d, hits, next_id)
    return hits


def _cast_figure(figure, o, d, hits, obj_id):
    base, scale, rot, (left_fwd, right_fwd) = figure
    # cull: only rays that meet the figure's bounding box
    bb_half = np.array([0.35, 0.9, 0.35], np.float32) * scale
    idx = _near(o, d, base + np.array([0, bb_half[1], 0], np.float32), float(np.linalg.norm(bb_half)))
    if len(idx) == 0:
        return
    ds = d[idx]
    r = _rot_y(rot)
    parts = list(_FIGURE)
    for side, fwd in ((1, left_fwd), (-1, right_fwd)):
        half, c = _ARM_FWD if fwd else _ARM_DOWN
        parts.append((4, "box", half, (side * 0.25, c[1], c[2])))
    for label, kind, size, centre in parts:
        c = base + r @ (np.array(centre, np.float32) * scale)
        if kind == "sphere":
            h, t, nrm = _sphere_hit(o, ds, c, size * scale)
        else:
            h, t, nrm = _box_hit(o, ds, c, np.array(size, np.float32) * scale, rot)
        hits.take(idx[h], t, nrm, FIGURE, obj_id, label)


def _texture(rng, p, cls):
    """A procedural texture value around 1 at world points p (checkers, stripes or smooth waves)."""
    kind = rng.integers(3) if cls not in (FLOOR, CEILING) else (0 if cls == FLOOR else 2)
    freq = rng.uniform(2, 8)
    phase = rng.uniform(0, 2 * math.pi, 3)
    if kind == 0:
        q = np.floor(p * freq / 2 + phase / 6).astype(np.int64).sum(1)
        return 1.0 + 0.18 * (2 * (q % 2) - 1)
    if kind == 1:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        return 1.0 + 0.15 * np.sign(np.sin(freq * 3 * (p @ axis) + phase[0]))
    return 1.0 + 0.08 * np.sin(freq * p[:, 0] + phase[0]) * np.sin(freq * p[:, 2] + phase[1])


# base colours of the classes (floor wood, pale walls and ceiling, vivid pictures); objects and figure
# parts vary around them
_CLASS_RGB = {FLOOR: (0.55, 0.38, 0.22), WALL: (0.8, 0.78, 0.7), CEILING: (0.92, 0.92, 0.9),
              PICTURE: (0.6, 0.3, 0.3), BOX: (0.5, 0.45, 0.4), SPHERE: (0.4, 0.5, 0.7), FIGURE: (0.8, 0.6, 0.5)}
_PART_RGB = {1: (0.85, 0.65, 0.5), 2: (0.2, 0.3, 0.7), 3: (0.2, 0.3, 0.7), 4: (0.85, 0.65, 0.5),
             5: (0.25, 0.22, 0.2), 6: (0.12, 0.1, 0.1)}


def _shade(rng, scene, hits, d, h, w):
    p = scene["cam"] + d * hits.t[:, None]
    albedo = np.empty((len(d), 3), np.float32)
    for obj in np.unique(hits.obj):
        m = hits.obj == obj
        cls = int(hits.cls[m][0])
        jitter = 0.12 if cls in (FLOOR, WALL, CEILING) else 0.35
        rgb = np.clip(np.array(_CLASS_RGB[cls]) + rng.uniform(-jitter, jitter, 3), 0.05, 1.0)
        albedo[m] = rgb * _texture(rng, p[m], cls)[:, None]
    fig = hits.cls == FIGURE
    if fig.any():
        shirt = rng.uniform(0.1, 0.9, 3)
        for part, rgb in _PART_RGB.items():
            m = fig & (hits.part == part)
            albedo[m] = shirt if part in (2, 3) else rgb
    to_light = scene["light"] - p
    dist2 = np.einsum("ij,ij->i", to_light, to_light)
    lambert = np.clip(np.einsum("ij,ij->i", hits.normal, to_light) / np.sqrt(dist2), 0, None)
    light = 0.25 + 0.1 * (hits.normal[:, 1] + 1) + 1.6 * lambert / (1 + 0.15 * dist2)
    img = albedo * light[:, None] * rng.uniform(0.8, 1.1)
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).reshape(h, w, 3).astype(np.float32)


def _edges(obj, cls, depth, normals):
    """1-px boundaries: a pixel is on an edge where its right or lower neighbour belongs to another
    object or class, lies more than 5 % deeper/nearer (at 256 px wide), or faces more than 30 degrees away."""
    edge = np.zeros(obj.shape, bool)
    # planes seen at grazing angles change depth faster per pixel in small images
    rel = 0.05 * max(1.0, 256 / obj.shape[1])
    for sl_a, sl_b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                       ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        jump = (obj[sl_a] != obj[sl_b]) | (cls[sl_a] != cls[sl_b])
        jump |= np.abs(depth[sl_a] - depth[sl_b]) > rel * np.minimum(depth[sl_a], depth[sl_b])
        jump |= (normals[sl_a] * normals[sl_b]).sum(-1) < math.cos(math.radians(30))
        edge[sl_a] |= jump
    return edge.astype(np.float32)


def render_scene(seed=0, index=0, size=(256, 256), split="train"):
    """One scene as numpy maps: image HxWx3 float in [0,1], semseg, depth, normals HxWx3, edge,
    human_parts, sal (same conventions as the sample tensors). Same arguments -> same arrays."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng([int(seed), SPLIT_STREAMS.get(split, 3), int(index)])
    scene = _sample_scene(rng)
    d, cam_axes = _camera_rays(scene, h, w)
    hits = _cast(scene, d)
    depth = (hits.t * (d @ scene["fwd"])).reshape(h, w)
    normals = (hits.normal @ cam_axes.T).reshape(h, w, 3)
    normals /= np.sqrt(np.einsum("...i,...i->...", normals, normals))[..., None]
    cls = hits.cls.reshape(h, w)
    obj = hits.obj.reshape(h, w)
    fig = cls == FIGURE
    if fig.any():
        human_parts = np.where(fig, hits.part.reshape(h, w), 0)
        sal = fig
    else:
        human_parts = np.full((h, w), 255, np.int64)
        ids, counts = np.unique(obj[(cls == BOX) | (cls == SPHERE)], return_counts=True)
        sal = obj == ids[counts.argmax()] if len(ids) else np.zeros((h, w), bool)
    return {
        "image": _shade(rng, scene, hits, d, h, w),
        "semseg": cls,
        "depth": depth.astype(np.float32),
        "normals": normals.astype(np.float32),
        "edge": _edges(obj, cls, depth, normals),
        "human_parts": human_parts,
        "sal": sal.astype(np.float32),
    }


class SyntheticScenes(Dataset):
    """Scenes rendered on the fly at `size` from (seed, split, index); `cache=True` keeps them."""

    name = "synthetic"
    tasks_available = TASKS
    classes = CLASSES

    def __init__(self, split="train", tasks=None, size=(256, 256), transform=None, seed=0, length=None,
                 cache=False):
        self.tasks = check_tasks(self.name, tasks, TASKS)
        self.split, self.seed, self.transform = split, seed, transform
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.length = LENGTHS.get(split, 250) if length is None else int(length)
        self.cache = {} if cache else None
        self.release = f"embedded synthetic scenes (seed {seed}, {split}, {self.length} scenes)"

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic scenes")
        if self.cache is not None and index in self.cache:
            sample = {k: v.clone() for k, v in self.cache[index].items()}
        else:
            maps = render_scene(self.seed, index, self.size, self.split)
            sample = to_sample({k: v for k, v in maps.items() if k == "image" or k in self.tasks})
            if self.cache is not None:
                self.cache[index] = {k: v.clone() for k, v in sample.items()}
        sample["meta"] = {"id": f"{self.split}_{index:06d}", "size": self.size, "dataset": self.name}
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self):
        return f"SyntheticScenes({self.release}, size={self.size}, tasks={self.tasks})"
