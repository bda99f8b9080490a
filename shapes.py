"""The built-in captioning dataset: procedurally generated scenes of coloured shapes.

A scene holds one to three objects (shape, colour, size, position) on a plain or noisy background.
Its captions name every object as "size colour shape", count them and state where neighbours stand
relative to each other, so a caption is fixed by the scene up to the choice of template: a model that
sees the image well can score high, and one that looks at the right place for each word (attention)
has something to gain, because relations need the whole image.

Everything is a pure function of a seed: make_scene(rng) -> scene (plain dict, picklable),
render(scene) -> image + per-pixel object map, captions(scene) -> token lists, boxes(scene, objmap).
"""
import re

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {  # well apart in hue, so a little jitter never makes two colours meet
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 45),
    "purple": (145, 60, 195),
    "orange": (245, 135, 25),
}
SIZES = {"small": 0.10, "large": 0.17}  # half-width of the object as a fraction of the image side
# The words whose attention map pointing accuracy checks (metrics.pointing), and what each names.
POINTING_WORDS = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}}
BACKGROUNDS = ("plain", "noisy")
NUMBERS = ("zero", "one", "two", "three")
RELATIONS = ("to the left of", "to the right of", "above", "below")
MAX_OBJECTS = 3
# Scenes are drawn again until every caption they produce is unambiguous: objects apart by GAP,
# left-to-right order clear by ORDER, and each neighbour pair clearly horizontal or vertical by AXIS.
# ORDER and AXIS exceed an 8 x 8 grid cell, so an encoder grid that coarse can still tell.
GAP, ORDER, AXIS = 0.03, 0.15, 0.15  # fractions of the image side


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def phrase(obj):
    """The object's noun phrase, always "size colour shape" (object-phrase metrics parse this)."""
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def _clear(a, b, side):
    """True when objects a and b can stand together without any caption about them being ambiguous."""
    dx, dy = abs(b["cx"] - a["cx"]), abs(b["cy"] - a["cy"])
    apart = max(dx - a["r"] - b["r"], dy - a["r"] - b["r"]) >= GAP * side
    return apart and dx >= ORDER * side and abs(dx - dy) >= AXIS * side


def make_scene(rng, image_size):
    """Draw a scene: objects with distinct (size, colour, shape), placed without overlap."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    while True:
        objects = []
        for _ in range(100 * n):
            size = str(rng.choice(list(SIZES)))
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
            r = SIZES[size] * image_size
            cx, cy = (float(v) for v in rng.uniform(r + 1, image_size - r - 1, size=2))
            obj = dict(shape=shape, colour=colour, size=size, cx=cx, cy=cy, r=r)
            key = (size, colour, shape)
            if any((o["size"], o["colour"], o["shape"]) == key for o in objects):
                continue
            if all(_clear(o, obj, image_size) for o in objects):
                jitter = rng.integers(-15, 16, size=3)
                obj["rgb"] = [int(v) for v in np.clip(np.add(COLOURS[colour], jitter), 0, 255)]
                objects.append(obj)
                if len(objects) == n:
                    break
        if len(objects) == n:
            break
    objects.sort(key=lambda o: o["cx"])  # captions list objects left to right
    grey = int(rng.integers(70, 171))
    return dict(
        image_size=image_size,
        background=str(rng.choice(BACKGROUNDS)),
        background_rgb=[int(v) for v in np.clip(grey + rng.integers(-12, 13, size=3), 0, 255)],
        noise_seed=int(rng.integers(2**31)),
        objects=objects,
    )


def _inside(obj, x, y):
    dx, dy, r = x - obj["cx"], y - obj["cy"], obj["r"]
    if obj["shape"] == "circle":
        return dx * dx + dy * dy <= r * r
    if obj["shape"] == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)  # 0.85: area close to the circle's
    if obj["shape"] == "triangle":  # apex up, base 2r wide at the bottom
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    return np.abs(dx) + np.abs(dy) <= r  # diamond


def render(scene):
    """Scene -> (image H x W x 3 uint8, object map H x W uint8: 0 background, k for objects[k-1])."""
    side = scene["image_size"]
    y, x = np.mgrid[0:side, 0:side] + 0.5  # pixel centres
    image = np.empty((side, side, 3), np.float32)
    image[:] = scene["background_rgb"]
    objmap = np.zeros((side, side), np.uint8)
    for k, obj in enumerate(scene["objects"], start=1):
        inside = _inside(obj, x, y)
        image[inside] = obj["rgb"]
        objmap[inside] = k
    noise = np.random.default_rng(scene["noise_seed"])
    std = 18.0 if scene["background"] == "noisy" else 3.0
    image += noise.normal(0.0, std, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objmap


def relation(a, b):
    """How a stands to b, and how b stands to a (a is left of b in the sort order)."""
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    if dx >= abs(dy):
        return "to the left of", "to the right of"
    return ("above", "below") if dy > 0 else ("below", "above")  # image y grows downwards


def captions(scene):
    """All reference captions of a scene (six templates), as token lists. With several objects four of
    the six state relations, so the most likely caption, the one a model learns to say, has them."""
    objs = scene["objects"]
    n, names = len(objs), [f"{article(phrase(o))} {phrase(o)}" for o in objs]
    listing = names[0] if n == 1 else " , ".join(names[:-1]) + " and " + names[-1]
    count = "there is one shape" if n == 1 else f"there are {NUMBERS[n]} shapes"
    if n == 1:
        texts = [listing, f"{count} : {listing}", f"{listing} on a {scene['background']} background",
                 f"an image of {listing}", f"a picture showing {listing}", f"a single {phrase(objs[0])}"]
    else:
        pairs = [(names[i], *relation(objs[i], objs[i + 1]), names[i + 1]) for i in range(n - 1)]
        chain = " and ".join(f"{a} {rel} {b}" for a, rel, _, b in pairs)
        backwards = " and ".join(f"{b} {inv} {a}" for a, _, inv, b in reversed(pairs))
        texts = [listing, f"{count} : {listing}", chain, f"{chain} on a {scene['background']} background",
                 f"an image of {chain}", backwards]
    return [t.split() for t in texts]


def boxes(scene, objmap):
    """Each object's shape, colour, size and tight pixel box [x0, y0, x1, y1] (x1, y1 exclusive)."""
    out = []
    for k, obj in enumerate(scene["objects"], start=1):
        ys, xs = np.nonzero(objmap == k)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        out.append(dict(shape=obj["shape"], colour=obj["colour"], size=obj["size"], box=box))
    return out


def pixel_labels(scene, objmap):
    """Per-pixel (colour, shape, size) class maps for dense encoder pretraining; 0 is background."""
    colour, shape, size = (np.zeros(objmap.shape, np.int64) for _ in range(3))
    for k, obj in enumerate(scene["objects"], start=1):
        at = objmap == k
        colour[at] = 1 + list(COLOURS).index(obj["colour"])
        shape[at] = 1 + SHAPES.index(obj["shape"])
        size[at] = 1 + list(SIZES).index(obj["size"])
    return colour, shape, size


def scene_seed(seed, index):
    """The generator of image `index`: independent of how images are spread over processes."""
    return np.random.default_rng([seed, index])


# ----------------------------------------------------------------------------- reading captions back

_PHRASE = rf"({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_STATEMENT = rf"an? {_PHRASE} ({'|'.join(RELATIONS)}) an? {_PHRASE}"


def parse(words):
    """A caption's object phrases [(size, colour, shape)] and relation statements
    [((size, colour, shape), relation, (size, colour, shape))], in order."""
    text = " ".join(words)
    phrases = re.findall(_PHRASE, text)
    statements = [(m[:3], m[3], m[4:]) for m in re.findall(_STATEMENT, text)]
    return phrases, statements


def relation_holds(box_a, relation, box_b):
    """Does "a <relation> b" describe these boxes: the centres differ mostly along that direction?"""
    dx = (box_b[0] + box_b[2] - box_a[0] - box_a[2]) / 2
    dy = (box_b[1] + box_b[3] - box_a[1] - box_a[3]) / 2  # image y grows downwards
    return {"to the left of": dx > abs(dy), "to the right of": -dx > abs(dy),
            "above": dy > abs(dx), "below": -dy > abs(dx)}[relation]
