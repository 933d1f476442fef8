"""Result encoder warm-up: builds one SEG and SR from a synthetic series, keeps nothing."""

from __future__ import annotations

import pytest

from dicom_node.errors import EncodeError
from dicom_node.results import warmup
from tests import results_support as rs


def test_warm_up_encoders_builds_every_object(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.results import kos, sc, seg, sr

    built: list[str] = []
    for module, name in ((seg, "encode_seg"), (sr, "encode_sr"), (sc, "encode_key_images"), (kos, "encode_kos")):
        original = getattr(module, name)

        def spy(*args: object, _original: object = original, **kwargs: object) -> object:
            result = _original(*args, **kwargs)  # type: ignore[operator]
            built.extend(str(ds.Modality) for ds in (result if isinstance(result, list) else [result]))
            return result

        monkeypatch.setattr(module, name, spy)
    assert warmup.try_warm_up_encoders(rs.INFO)
    assert built == ["SEG", "SR", "OT", "OT", "KO"]  # the summary and one key image


def test_failed_warm_up_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(info: object) -> None:
        raise EncodeError("broken")

    monkeypatch.setattr(warmup, "warm_up_encoders", fail)
    assert not warmup.try_warm_up_encoders(rs.INFO)
    assert "warm-up failed" in caplog.text
