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
