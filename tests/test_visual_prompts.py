"""Visual prompts: disk dilation vs the per-pixel definition, RLE helpers, seeded generation."""
import numpy as np
import pytest

from psalm.data.visual_prompts import (
    decode_rle,
    dilate_disk,
    disk_kernel,
    encode_rle,
    generate_visual_prompts,
    rasterize_prompt,
    rle_area,
)


def _disks_reference(mask, radius):
    """The official definition: union over foreground pixels of {distance <= radius} (slow loop)."""
    h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros_like(mask, dtype=bool)
    for r, c in np.argwhere(mask):
        out |= np.sqrt((yy - r) ** 2 + (xx - c) ** 2) <= radius
    return out


def test_disk_kernel_area():
    assert disk_kernel(10).sum() == 317 and disk_kernel(5).sum() == 81 and disk_kernel(0).sum() == 1


@pytest.mark.parametrize("radius", [1, 5, 10])
def test_dilate_disk_equals_per_pixel_circles(radius):
    rng = np.random.default_rng(radius)
    mask = rng.random((40, 50)) > 0.995
    mask[0, 0] = mask[39, 49] = mask[20, 0] = True  # border pixels: disks clipped, no border artefact
    np.testing.assert_array_equal(dilate_disk(mask, radius), _disks_reference(mask, radius))


def test_rle_roundtrip_and_uncompressed():
    mask = np.zeros((7, 9), dtype=bool)
    mask[2:5, 3:8] = True
    rle = encode_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [7, 9]
    np.testing.assert_array_equal(decode_rle(rle), mask)
    assert rle_area(rle) == 15
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = mask.flatten(order="F").astype(int)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    np.testing.assert_array_equal(decode_rle({"counts": runs, "size": [7, 9]}), mask)
    with pytest.raises(ValueError, match="COCO RLE"):
        decode_rle([1, 2, 3])


def test_rasterize_prompt_types():
    point = np.zeros((30, 30), dtype=bool)
    point[15, 15] = True
    assert rasterize_prompt("point", encode_rle(point), point_radius=3).sum() == disk_kernel(3).sum()
    assert rasterize_prompt("scribble", encode_rle(point), scribble_radius=2).sum() == disk_kernel(2).sum()
    assert rasterize_prompt("box", encode_rle(point)).sum() == 1
    with pytest.raises(ValueError, match="unknown visual prompt type"):
        rasterize_prompt("lasso", encode_rle(point))


def _two_part_mask():
    mask = np.zeros((80, 100), dtype=bool)
    mask[10:40, 10:50] = True  # component 1
    mask[50:75, 60:95] = True  # component 2
    mask[2:4, 90:92] = True  # 4 pixels: too small for point / box / scribble
    return mask


def test_generation_is_seeded_and_follows_the_recipe():
    mask = _two_part_mask()
    a = generate_visual_prompts(mask, np.random.default_rng(3))
    assert a == generate_visual_prompts(mask, np.random.default_rng(3))
    assert a != generate_visual_prompts(mask, np.random.default_rng(4))
    assert set(a) == {"point", "scribble", "box", "mask"}

    point = decode_rle(a["point"])
    assert point.sum() == 2 and mask[point].all()  # one pixel inside each large component
    assert not point[:5, 85:].any()

    box = decode_rle(a["box"])
    for (r0, r1, c0, c1) in [(10, 40, 10, 50), (50, 75, 60, 95)]:
        # the bbox scaled about its centre by s in [0.9, 1.1]: covers the inner 90%, stays within 110%
        h, w = r1 - r0, c1 - c0
        inner = box[int(r0 + 0.05 * h) + 1: int(r1 - 0.05 * h) - 1, int(c0 + 0.05 * w) + 1: int(c1 - 0.05 * w) - 1]
        assert inner.all()
    assert not box[:5, 85:].any()
    rows, cols = np.nonzero(box)
    assert rows.min() >= 10 - 2 and cols.max() <= 95 + 2

    blurred_mask = decode_rle(a["mask"])
    inter = (blurred_mask & mask).sum() / (blurred_mask | mask).sum()
    assert inter > 0.85

    scribble = decode_rle(a["scribble"])
    assert 0 < scribble.sum() < mask.sum()


def test_generation_edge_cases():
    assert generate_visual_prompts(np.zeros((20, 20), bool), np.random.default_rng(0)) == {}
    tiny = np.zeros((20, 20), bool)
    tiny[5:7, 5:7] = True  # 4 pixels: only the mask prompt may exist
    assert set(generate_visual_prompts(tiny, np.random.default_rng(0))) <= {"mask"}
    with pytest.raises(TypeError, match="Generator"):
        generate_visual_prompts(tiny, 0)
