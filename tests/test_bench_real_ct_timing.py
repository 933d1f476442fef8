"""bench.real_ct_timing: it skips without the real CT folder, and its table reports the
candidate stage, the candidates, the views and the cost per candidate."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import real_ct_timing


def _round(postprocessing: float, classifier: float) -> dict[str, object]:
    return {"analyse_s": 10.0, "cpu_s": 12.0, "findings": 2, "preprocessing": 0.3, "inference": 5.0,
            "postprocessing": postprocessing, "measure": 0.2,
            "transforms": {"ClassifyCandidatesd": postprocessing - 0.3, "MassChanneld": 0.3},
            "candidates": 400, "views": 1600,
            "steps": {"lung_gate": 0.1, "candidates": 0.4, "classifier": classifier, "merge": 0.3,
                      "finding_scores": 0.1},
            "ms_per_candidate": 1000.0 * (0.4 + classifier) / 400}


def test_it_skips_with_a_message_when_the_folder_is_absent(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert real_ct_timing.main([str(tmp_path / "absent"), "--json", str(tmp_path / "out.json")]) == 0
    assert "skipped, no real CT folder" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_the_table_gives_the_candidate_stage_and_the_cost_per_candidate() -> None:
    table = real_ct_timing.markdown("series", (30, 512, 512), [_round(2.0, 0.8), _round(1.6, 0.4), _round(1.8, 0.6)])
    lines = table.splitlines()
    assert "| postprocessing | 2.00 | 1.70 (1.60–1.80) |" in lines
    assert "| candidate stage: classifier | 0.80 | 0.50 (0.40–0.60) |" in lines
    assert "| candidates; classifier views | 400; 1600 | 400; 1600 |" in lines
    assert "| per candidate (finding + classifier), ms | 3.00 | 2.25 (2.00–2.50) |" in lines
    assert lines[0].startswith("### series: 30 slices")


def test_the_stand_in_interpolates_the_slices_and_mirrors_the_ends() -> None:
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from plugin.types import Volume

    values = torch.arange(4, dtype=torch.float32) * 100.0  # slice k holds 100 k, 8 mm apart
    image = values.reshape(1, 1, 1, 4).expand(1, 2, 3, 4).contiguous()
    affine = np.diag([0.5, 0.5, 8.0, 1.0])
    affine[:3, 3] = (10.0, 20.0, 30.0)
    volume = Volume(image=MetaTensor(image, affine=torch.as_tensor(affine)), slices=[], study_instance_uid="1.2",
                    series_instance_uid="1.2.3", frame_of_reference_uid="1.2.4", spacing_mm=(0.5, 0.5, 8.0))
    same = real_ct_timing.stand_in(volume, 4, 8.0)
    assert torch.equal(torch.as_tensor(same.image), image)
    assert np.allclose(np.asarray(same.image.affine), affine)

    longer = real_ct_timing.stand_in(volume, 9, 4.0)  # 32 mm where the stack spans 24: 4 mm beyond each end
    assert longer.spacing_mm == (0.5, 0.5, 4.0) and longer.image.shape == (1, 2, 3, 9)
    # positions -4, 0, 4, ..., 28 mm: -4 mirrors to 4 (50), 28 to 20 (250)
    expected = [50.0, 0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 250.0]
    assert torch.as_tensor(longer.image)[0, 1, 2].tolist() == expected
    assert np.allclose(np.asarray(longer.image.affine)[:3, 2], (0.0, 0.0, 4.0))
    assert np.allclose(np.asarray(longer.image.affine)[:3, 3], (10.0, 20.0, 26.0))  # 4 mm before slice 0
