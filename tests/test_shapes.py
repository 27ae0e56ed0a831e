"""The synthetic shapes world: deterministic, with masks and boxes that agree with the pixels."""

import numpy as np

from dlpipe.training.shapes import COLOURS, KINDS, ShapesWorld


def test_same_seed_same_images_other_seed_other_images():
    a = ShapesWorld(seed=3).classification_set(20)
    b = ShapesWorld(seed=3).classification_set(20)
    c = ShapesWorld(seed=4).classification_set(20)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_scene_depends_only_on_its_index():
    world = ShapesWorld(seed=1)
    first = world.render(world.scene(7))[0]
    world.classification_set(5)  # generating others does not disturb scene 7
    assert np.array_equal(first, ShapesWorld(seed=1).render(world.scene(7))[0])


def test_labels_cover_every_kind():
    _, labels = ShapesWorld(seed=0).classification_set(300)
    counts = np.bincount(labels, minlength=len(KINDS))
    assert counts.min() > 20  # roughly balanced over the 6 kinds


def test_mask_and_boxes_agree_with_the_scene():
    world = ShapesWorld(seed=5, image_size=(64, 96), shapes_per_scene=(1, 5), radius=(0.1, 0.2))
    for i in range(20):
        scene = world.scene(i)
        image, mask = world.render(scene)
        assert image.shape == (64, 96, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 96)
        instances = world.instance_mask(scene)
        top = scene.shapes[-1]  # the last shape drawn is fully visible
        ys, xs = np.nonzero(instances == len(scene.shapes))
        assert (mask[ys, xs] == top.label + 1).all()
        assert len(xs) > 0
        x0, y0, x1, y1 = top.box()
        assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) + 1
        assert ys.min() >= np.floor(y0) - 1 and ys.max() <= np.ceil(y1) + 1
        assert set(np.unique(mask)) <= {0, *(s.label + 1 for s in scene.shapes)}


def test_shapes_differ_from_background():
    world = ShapesWorld(seed=2)
    for i in range(10):
        image, mask = world.render(world.scene(i))
        inside = image[mask > 0].astype(float).mean(0)
        outside = image[mask == 0].astype(float).mean(0)
        assert np.abs(inside - outside).max() > 20


def test_mask_is_what_the_image_shows():
    """Each pixel's label is the one whose colour covers most of it, not a rasterised outline around the
    antialiased shape (1x polygons were half a pixel wider: 14% of shape pixels looked like background)."""
    world = ShapesWorld(seed=5, image_size=(64, 96), radius=(0.1, 0.2))
    disagree = shape_pixels = 0
    for i in range(60):
        scene = world.scene(i)
        if scene.background != "solid":
            continue
        image, mask = world.render(scene)
        x = image.astype(float)
        nearer_shape = (np.linalg.norm(x - COLOURS[scene.shapes[0].colour], axis=-1)
                        < np.linalg.norm(x - scene.background_colours[0], axis=-1))
        disagree += (nearer_shape != (mask > 0)).sum()
        shape_pixels += (mask > 0).sum()
    assert shape_pixels > 1000
    assert disagree / shape_pixels < 0.05  # pixel noise only (measured 2%)
