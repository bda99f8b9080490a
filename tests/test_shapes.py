"""The shapes generator: deterministic, boxes inside the image, captions true of the rendered scene."""
import re

import numpy as np
import pytest

import shapes

SIDE = 64
PHRASE = r"(small|large) (\w+) (circle|square|triangle|diamond)"
BARE = r"(?:small|large) \w+ (?:circle|square|triangle|diamond)"
RELATIONS = ("to the left of", "to the right of", "above", "below")


def scenes(n=300, seed=7, side=SIDE):
    for i in range(n):
        scene = shapes.make_scene(shapes.scene_seed(seed, i), side)
        image, objmap = shapes.render(scene)
        yield scene, image, objmap, shapes.boxes(scene, objmap), shapes.captions(scene)


def test_deterministic():
    a, b = list(scenes(20)), list(scenes(20))
    for (s1, i1, m1, b1, c1), (s2, i2, m2, b2, c2) in zip(a, b, strict=True):
        assert s1 == s2 and b1 == b2 and c1 == c2
        assert np.array_equal(i1, i2) and np.array_equal(m1, m2)
    other = shapes.make_scene(shapes.scene_seed(8, 0), SIDE)
    assert other != a[0][0]


@pytest.mark.parametrize("side", [32, 64, 128])
def test_boxes_inside_and_tight(side):
    for _, image, objmap, boxes, _ in scenes(100, side=side):
        assert image.shape == (side, side, 3) and image.dtype == np.uint8
        assert 1 <= len(boxes) <= shapes.MAX_OBJECTS
        for k, b in enumerate(boxes, start=1):
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side
            inside = objmap[y0:y1, x0:x1] == k
            assert inside.sum() == (objmap == k).sum()  # every pixel of the object is in its box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def nearest_colour(rgb):
    return min(shapes.COLOURS, key=lambda c: np.abs(np.subtract(shapes.COLOURS[c], rgb)).sum())


def test_captions_true_of_the_scene():
    """Checked against the rendered pixels and the boxes, not against the generator's own fields."""
    for scene, image, objmap, boxes, caps in scenes():
        objects = {}
        for b in boxes:
            cx, cy = (int(v) for v in centre(b["box"]))
            assert nearest_colour(image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)) == b["colour"]
            objects[f"{b['size']} {b['colour']} {b['shape']}"] = b["box"]
        assert len(objects) == len(boxes)  # no two objects share a description
        assert len(caps) == 6
        for tokens in caps:
            text = " ".join(tokens)
            named = [" ".join(m) for m in re.findall(PHRASE, text)]
            assert set(named) == set(objects), (text, objects)  # every object, nothing else
            count = re.match(r"there (?:is|are) (\w+) shapes? :", text)
            if count:
                assert shapes.NUMBERS.index(count.group(1)) == len(boxes)
            if " background" in text:
                assert text.endswith(f"on a {scene['background']} background")
                noisy = image[objmap == 0].std(0).mean() > 10
                assert noisy == (scene["background"] == "noisy")
            rel = "|".join(RELATIONS)
            bare = re.sub(r"\ban? (?=small|large)", "", text)  # "a small red circle" -> "small red circle"
            for a, r, b in re.findall(rf"({BARE}) ({rel}) ({BARE})", bare):
                assert _holds(centre(objects[a]), r, centre(objects[b])), (text, a, r, b)


def _holds(a, relation, b):
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"to the left of": dx > abs(dy), "to the right of": -dx > abs(dy),
            "above": dy > abs(dx), "below": -dy > abs(dx)}[relation]


def test_relations_cover_every_direction_and_pixel_labels():
    seen = set()
    for scene, _, objmap, _, caps in scenes(200):
        for tokens in caps:
            seen.update(r for r in RELATIONS if f" {r} " in " ".join(tokens))
        colour, shape, size = shapes.pixel_labels(scene, objmap)
        assert ((colour > 0) == (objmap > 0)).all() and ((shape > 0) == (size > 0)).all()
        for k, obj in enumerate(scene["objects"], start=1):
            assert set(np.unique(shape[objmap == k])) == {1 + shapes.SHAPES.index(obj["shape"])}
    assert seen == set(RELATIONS)


def test_article():
    assert shapes.article("orange") == "an" and shapes.article("small") == "a"
