"""The lung-nodule bundle's second detector (models/lung_nodules/candidates.py and
``ClassifyCandidatesd``): candidates are the thick soft tissue in the lungs, their
outlines are cut free of what they touch, and the committed classifier adds a nodule
that the segmentation network missed and vetoes what it is sure is none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from monai.data import MetaTensor

from models.lung_nodules.candidates import (
    PATCH,
    depth_map,
    find_candidates,
    load_classifier,
    patches,
    quantised,
    score,
    screened_score,
)
from models.lung_nodules.transforms import ClassifyCandidatesd, elongation, lung_region
from plugin.finding_scores import SCORES_KEY

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "lung_nodules" / "models" / "candidates.pt"
SPACING = np.array([1.0, 1.0, 1.25])
LUNG, SOFT = (-850.0 + 1000.0) / 1400.0, (30.0 + 1000.0) / 1400.0  # scaled to [0, 1]


def _chest(seed: int = 0) -> np.ndarray:
    """(X, Y, Z) = (160, 120, 80) at 1 x 1 x 1.25 mm: a body with two noisy lungs."""
    rng = np.random.default_rng(seed)
    image = np.full((160, 120, 80), SOFT, dtype=np.float32)
    image[:, :, :] += rng.normal(0, 10 / 1400, image.shape).astype(np.float32)
    image[:4], image[-4:], image[:, :4], image[:, -4:] = 0.0, 0.0, 0.0, 0.0  # air outside
    for lo, hi in ((20, 72), (88, 140)):
        image[lo:hi, 20:100, 8:72] = LUNG + rng.normal(0, 15 / 1400, (hi - lo, 80, 64))
    return image


def _ball(image: np.ndarray, centre: tuple[float, float, float], radius_mm: float,
          value: float = SOFT) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    dist2 = sum(((g - c) * mm) ** 2 for g, c, mm in zip(grids, centre, SPACING))
    inside = dist2 <= radius_mm ** 2
    image[inside] = value
    return inside


def _tube(image: np.ndarray, y: int, z: float, radius_mm: float, x: slice) -> None:
    yy, zz = np.ogrid[0:image.shape[1], 0:image.shape[2]]
    disc = ((yy - y) ** 2 + ((zz - z) * SPACING[2]) ** 2) <= radius_mm ** 2
    image[x][:, disc] = SOFT


def _candidates(image: np.ndarray):  # type: ignore[no-untyped-def]
    return find_candidates(image, SPACING, lung_region(image, step=2), step=2)


def test_a_nodule_is_a_candidate_a_thin_vessel_is_not() -> None:
    image = _chest()
    _ball(image, (45, 60, 40), 5.0)  # a 10 mm nodule in the right lung
    _tube(image, 40, 20, 1.0, slice(92, 136))  # a 2 mm vessel in the left lung
    cands = _candidates(image)
    thick = np.flatnonzero(cands.thickness_mm >= 3.0)  # (thinner ones: corners of the box lungs)
    assert len(thick) == 1
    assert np.abs(cands.centres[thick[0]] - np.array([45, 60, 40])).max() <= 1
    assert 4.0 <= cands.thickness_mm[thick[0]] <= 5.5
    box = cands.box
    near_vessel = (slice(92 - box[0].start, 136 - box[0].start), slice(38 - box[1].start, 43 - box[1].start),
                   slice(17 - box[2].start, 24 - box[2].start))
    assert not cands.cores[near_vessel].any()


def test_a_nodule_on_a_thick_vessel_gets_its_own_candidate() -> None:
    """Its core joins the vessel's, which ends in a thicker blob (the hilum): the core is
    split at the vessel, so the nodule is a candidate centred on itself."""
    image = _chest()
    _ball(image, (30, 60, 40), 5.0)  # a 10 mm nodule
    _tube(image, 60, 40, 3.2, slice(30, 62))  # on a 6.4 mm vessel
    _ball(image, (62, 60, 40), 7.0)  # that ends in a 14 mm blob
    cands = _candidates(image)
    assert find_candidates(image, SPACING, lung_region(image, step=2), 2, split=False).count < cands.count
    thick = np.flatnonzero(cands.thickness_mm >= 3.0)
    nearest = np.abs(cands.centres[thick] - np.array([30, 60, 40])).max(axis=1)
    assert nearest.min() <= 1, cands.centres[thick]
    assert 4.0 <= cands.thickness_mm[thick[np.argmin(nearest)]] <= 5.5
    assert len(thick) == 2  # the nodule and the blob; the vessel between them is neither


def test_a_thick_vessel_is_one_candidate() -> None:
    image = _chest()
    _tube(image, 60, 40, 3.5, slice(24, 68))  # a 7 mm vessel across the right lung
    cands = _candidates(image)
    assert np.count_nonzero(cands.thickness_mm >= 3.0) == 1


def test_the_outline_is_the_nodule_cut_free_of_a_thick_vessel() -> None:
    image = _chest()
    nodule = _ball(image, (45, 60, 40), 5.0)
    _tube(image, 60, 40, 2.8, slice(50, 72))  # a 5.6 mm vessel touching it, running to the hilum
    cands = _candidates(image)
    index = int(np.argmax(cands.thickness_mm)) + 1
    box, mask = cands.outline(index, SPACING)
    outline = np.zeros(image.shape, dtype=bool)
    outline[box] = mask
    dice = 2 * (outline & nodule).sum() / (outline.sum() + nodule.sum())
    assert dice >= 0.85, dice
    assert not outline[62:72].any()  # the vessel beyond the nodule is not part of it


def test_patches_keep_their_size_at_the_edges() -> None:
    image = np.arange(20 * 20 * 10, dtype=np.uint8).reshape(20, 20, 10)
    out = patches(image, np.array([[0, 0, 0], [10, 10, 5]]))
    assert out.shape == (2, *PATCH)
    assert out[0, 0, 0, 0] == image[0, 0, 0]  # edges replicated
    assert out[1, PATCH[0] // 2, PATCH[1] // 2, PATCH[2] // 2] == image[10, 10, 5]


def test_a_mirrored_score_does_not_depend_on_which_way_the_patch_faces() -> None:
    net = load_classifier(WEIGHTS)
    image = _chest(3)
    _ball(image, (45, 60, 40), 4.0)
    _tube(image, 62, 40, 2.8, slice(49, 72))
    cands = _candidates(image)
    batch = patches(quantised(image), cands.centres)
    mirror = np.ascontiguousarray(batch[:, ::-1, :, ::-1])
    assert np.allclose(score(net, batch), score(net, mirror), atol=1e-5)
    plain, plain_mirror = score(net, batch, mirrored=False), score(net, mirror, mirrored=False)
    assert not np.allclose(plain, plain_mirror, atol=1e-5)  # one view alone does depend on it


def _run(image: np.ndarray, prob: np.ndarray, **kwargs: float) -> np.ndarray:
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    data = {"image": MetaTensor(torch.from_numpy(image)[None], affine=affine),
            "pred": MetaTensor(torch.from_numpy(prob)[None], affine=affine)}
    out = ClassifyCandidatesd(keys="pred", weights=WEIGHTS, **kwargs)(data)["pred"]
    assert isinstance(out, MetaTensor)
    return out[0].numpy()


def test_the_classifier_adds_a_nodule_the_network_missed() -> None:
    assert WEIGHTS.is_file(), "the committed classifier weights are missing"
    image = _chest(1)
    nodule = _ball(image, (45, 60, 40), 5.0)
    out = _run(image, np.zeros_like(image))
    found = out > 0.5
    assert 2 * (found & nodule).sum() / (found.sum() + nodule.sum()) >= 0.85
    assert (found & ~nodule).sum() <= 0.2 * nodule.sum()  # nothing else added


class _Sure(torch.nn.Module):
    """A stand-in classifier that scores every candidate ``logit``."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1), self.logit)


def test_a_component_on_a_rejected_candidate_is_vetoed_others_kept() -> None:
    image = _chest(2)
    _ball(image, (45, 60, 40), 5.0)
    prob = np.zeros_like(image)
    prob[42:49, 57:64, 38:43] = 0.9  # the network marks the candidate
    prob[100:103, 30:33, 20:23] = 0.9  # and a speck with no candidate (thin), in the lung
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    for logit, kept in ((-10.0, False), (0.0, True)):  # scores 0.00005 and 0.5: veto 0.2
        transform = ClassifyCandidatesd(keys="pred", weights=WEIGHTS, accept=0.95, veto=0.2)
        transform.net = _Sure(logit)
        data = {"image": MetaTensor(torch.from_numpy(image)[None], affine=affine),
                "pred": MetaTensor(torch.from_numpy(prob.copy())[None], affine=affine)}
        out = transform(data)["pred"][0].numpy()
        assert bool(out[42:49, 57:64, 38:43].max() > 0.5) == kept
        assert out[100:103, 30:33, 20:23].min() == np.float32(0.9)  # no candidate: untouched


def test_the_depth_map_is_the_exact_euclidean_distance() -> None:
    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((60, 50, 40)), 2) > 0.5
    mask[0], mask[:, 0], mask[:, :, 0] = False, False, False
    spacing = np.array([0.7, 0.9, 1.25])  # anisotropic, as a resampled chest is not
    depth = depth_map(mask, spacing)
    assert np.allclose(depth, ndimage.distance_transform_edt(mask, sampling=spacing), atol=1e-5)
    assert np.array_equal(depth >= 2.5, ndimage.distance_transform_edt(mask, sampling=spacing) >= 2.5)


def test_quantised_rounds_half_to_even_and_clips() -> None:
    image = np.array([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5, 1.0, 1.7], dtype=np.float32)
    expected = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(quantised(image), expected)
    assert quantised(image).dtype == np.uint8


def test_a_score_does_not_depend_on_the_batch_size() -> None:
    net = load_classifier(WEIGHTS)
    batch = np.random.default_rng(2).integers(0, 256, size=(70, *PATCH), dtype=np.uint8)
    assert np.allclose(score(net, batch, batch=7), score(net, batch, batch=256), atol=1e-6)


def test_each_finding_gets_a_score_and_a_point_inside_it() -> None:
    """The score of a finding is the higher of the network's probability and the best
    candidate's score; its point lies in the finding (world coordinates, RAS)."""
    image = _chest(2)
    _ball(image, (45, 60, 40), 5.0)
    prob = np.zeros_like(image)
    prob[42:49, 57:64, 38:43] = 0.6  # the network marks the nodule, not very sure
    prob[100:103, 30:33, 20:23] = 0.8  # a speck with no candidate
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, 5.0, 100.0], dtype=torch.float64)
    transform = ClassifyCandidatesd(keys="pred", weights=WEIGHTS, accept=0.95, veto=0.2)
    transform.net = _Sure(2.0)  # every candidate 0.88
    data = {"image": MetaTensor(torch.from_numpy(image)[None], affine=affine),
            "pred": MetaTensor(torch.from_numpy(prob)[None], affine=affine)}
    out = transform(data)
    inverse = np.linalg.inv(affine.numpy())
    boxes = {0.8: (slice(100, 103), slice(30, 33), slice(20, 23)), 0.88: (slice(40, 51), slice(55, 66), slice(36, 45))}
    slices: dict[float, set[int]] = {0.8: set(), 0.88: set()}
    for point, value in out[SCORES_KEY]:
        box = boxes[round(value, 2)]  # every point carries its finding's score
        index = (inverse @ np.append(point, 1.0))[:3]
        assert all(s.start <= i < s.stop for i, s in zip(index, box)), (index, box)
        slices[round(value, 2)].add(int(round(index[2])))
    # a point on every slice of each finding: a finding that thick source slices part in
    # two, or that the pleural cut trims, still holds one
    assert slices[0.8] == {20, 21, 22}
    assert set(range(38, 43)) <= slices[0.88]


def test_a_component_wider_than_the_patch_is_neither_vetoed_nor_gated_like_a_nodule() -> None:
    """A mass (wider than the classifier's 32 mm patch) survives a rejecting classifier
    and needs only 20 % of itself in the lungs; a nodule-sized component does not."""
    image = _chest(2)
    prob = np.zeros_like(image)
    transform = ClassifyCandidatesd(keys="pred", weights=WEIGHTS, accept=0.95, veto=0.5, min_inside=0.6)
    transform.net = _Sure(-10.0)  # every candidate rejected
    region = np.ones(tuple((n + 1) // 2 for n in image.shape), dtype=bool)
    wide = (slice(20, 60), slice(30, 70), slice(30, 40))  # 40 x 40 voxels in-plane
    small = (slice(90, 100), slice(30, 40), slice(30, 36))
    prob[wide] = 0.9
    prob[small] = 0.9
    region[10:25, 15:35, :] = False  # 30 of the wide component's 40 columns (x) outside the lungs
    region[45:50, 15:20, :] = False  # the small one wholly outside
    cands = _candidates(image)
    out = transform.merge(prob, cands, np.zeros(cands.count), np.array(SPACING), region)
    assert out[wide].min() == np.float32(0.9)
    assert out[small].max() == 0.0
    assert transform.wider_than_a_patch(*ndimage.label(prob > 0.5)).tolist() == [False, True, False]


def test_the_tube_rule_is_looser_for_a_mass_sized_component() -> None:
    """Nodule-sized tubes go at elongation 2 (vessel segments); a component wider than
    the patch goes only past ``mass_max_elongation`` (2.5): a lobulated mass twice as
    long as it is wide stays, a wide stretch of vessels three times longer does not."""
    image = _chest(2)
    prob = np.zeros_like(image)
    transform = ClassifyCandidatesd(keys="pred", weights=WEIGHTS, min_inside=0.0, max_elongation=2.0)
    region = np.ones(tuple((n + 1) // 2 for n in image.shape), dtype=bool)
    mass = (slice(5, 45), slice(5, 45), slice(5, 75))  # 40 x 40 x 87.5 mm
    vessels = (slice(60, 93), slice(60, 93), slice(0, 80))  # 33 x 33 x 100 mm
    tube = (slice(120, 126), slice(10, 16), slice(10, 50))  # 6 x 6 x 50 mm
    for box in (mass, vessels, tube):
        prob[box] = 0.9
    components, count = ndimage.label(prob > 0.5)
    where = np.nonzero(components)
    mass_e, vessels_e, tube_e = elongation(where, components[where], count, SPACING)[1:]
    assert 2.0 < mass_e < 2.5 < vessels_e < tube_e
    cands = _candidates(image)
    out = transform.merge(prob, cands, np.zeros(cands.count), SPACING, region)
    assert out[mass].min() == np.float32(0.9)
    assert out[vessels].max() == 0.0 and out[tube].max() == 0.0


class _Sided(torch.nn.Module):
    """A stand-in classifier: the brighter the patch, the surer, and surer still when its
    first half along X is the brighter one (so the eight views differ)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[2] // 2
        first, second = x[:, :, :half].mean(dim=(1, 2, 3, 4)), x[:, :, half:].mean(dim=(1, 2, 3, 4))
        return (40.0 * ((first + second) / 2 - 0.3) + 20.0 * (first - second))[:, None]


def test_screened_scores_are_every_views_mean_where_they_count() -> None:
    """A candidate whose mean reaches ``accept``, or one asked for exactly, gets the
    mean of all eight views; any other stays below ``accept``, after fewer views."""
    rng = np.random.default_rng(4)
    level = rng.uniform(0, 100, size=200)
    batch = (level[:, None, None, None] + rng.uniform(0, 20, size=(200, *PATCH))).astype(np.uint8)
    batch[:, : PATCH[0] // 2] += rng.integers(0, 60, size=200, dtype=np.uint8)[:, None, None, None]
    net = _Sided()
    full = score(net, batch)
    exact = np.zeros(len(batch), dtype=bool)
    exact[::7] = True
    screened, views = screened_score(net, batch, 0.7, exact)
    counted = exact | (full >= 0.7)
    hopeless = ~counted & (full < 0.2)
    assert 20 < (full >= 0.7).sum() and hopeless.sum() > 40 and (~counted & ~hopeless).any()
    assert np.allclose(screened[counted], full[counted], atol=1e-6)
    assert (screened[~counted] < 0.7).all()
    assert views <= 8 * len(batch) - 5 * int(hopeless.sum())  # the hopeless stop after 3 views
    assert views >= 8 * int(counted.sum())


def test_the_screened_detector_merges_as_scoring_every_view() -> None:
    """The bundle's transform (screened scores) gives the same prediction and finding
    scores as with every view of every candidate scored."""

    class EveryView(ClassifyCandidatesd):
        def score_candidates(self, image, cands, probs, device):  # type: ignore[no-untyped-def]
            return super().score_candidates(image, cands, None, device)

    image = _chest(3)
    _ball(image, (45, 60, 40), 4.5)
    _ball(image, (120, 50, 30), 3.5)
    _tube(image, 62, 40, 2.8, slice(49, 72))
    _tube(image, 80, 20, 3.0, slice(92, 136))
    prob = np.zeros_like(image)
    prob[118:123, 48:53, 28:33] = 0.9  # the network marks the second nodule
    prob[100:104, 78:82, 18:22] = 0.7  # and a piece of vessel
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    outs = []
    for kind in (ClassifyCandidatesd, EveryView):
        transform = kind(keys="pred", weights=WEIGHTS, min_inside=0.6, max_elongation=2.0)
        data = {"image": MetaTensor(torch.from_numpy(image.copy())[None], affine=affine),
                "pred": MetaTensor(torch.from_numpy(prob.copy())[None], affine=affine)}
        outs.append((transform(data), transform.profile))
    (screened, profile), (every, every_profile) = outs
    assert np.array_equal(np.asarray(screened["pred"]), np.asarray(every["pred"]))
    assert screened[SCORES_KEY] == every[SCORES_KEY]
    assert profile["candidates_count"] == every_profile["candidates_count"] > 0
    assert profile["views"] <= every_profile["views"] == 8 * every_profile["candidates_count"]
