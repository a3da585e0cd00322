"""model_zoo.compare: the paired per-object difference, its bootstrap interval, and what it prints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model_zoo.compare import main, paired


def evaluation(path, per_object: dict[str, float]) -> str:
    rows = {key: {"psnr": value, "ssim": value / 100} for key, value in per_object.items()}
    results = {"reconstruction": {"psnr": float(np.mean(list(per_object.values()))),
                                  "ssim": float(np.mean(list(per_object.values()))) / 100, "per_object": rows}}
    path.write_text(json.dumps(results))
    return str(path)


def test_the_difference_is_after_minus_before_over_the_shared_objects_with_an_interval_around_it(tmp_path, capsys):
    rng = np.random.default_rng(1)
    before = {f"object-{i:03d}": 18.0 + float(rng.normal()) for i in range(40)}
    gains = {key: 0.5 + 0.2 * float(rng.normal()) for key in before}
    after = {key: value + gains[key] for key, value in before.items()}
    after["only-in-after"] = 40.0  # not paired: ignored
    a, b = evaluation(tmp_path / "before.json", before), evaluation(tmp_path / "after.json", after)
    result = paired(json.loads(open(a).read()), json.loads(open(b).read()), "psnr")
    assert result["objects"] == 40
    assert result["mean"] == pytest.approx(np.mean(list(gains.values())), abs=1e-12)
    assert result["low"] < result["mean"] < result["high"]
    # The interval of a mean of 40 differences with std 0.2: about ±1.96 · 0.2 / √40 ≈ ±0.06.
    assert 0.03 < result["high"] - result["mean"] < 0.1 and 0.03 < result["mean"] - result["low"] < 0.1
    assert main([a, b]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed.startswith("reconstruction psnr: after ") and f"after − before {result['mean']:+.4f}" in printed
    swapped = paired(json.loads(open(b).read()), json.loads(open(a).read()), "psnr")
    assert swapped["mean"] == pytest.approx(-result["mean"])


def test_fewer_than_two_shared_objects_is_refused(tmp_path):
    a = json.loads(open(evaluation(tmp_path / "a.json", {"x": 1.0, "y": 2.0})).read())
    b = json.loads(open(evaluation(tmp_path / "b.json", {"x": 1.5, "z": 2.0})).read())
    with pytest.raises(ValueError, match="need >= 2 objects"):
        paired(a, b, "psnr")


def test_generation_is_compared_per_object_and_objects_without_foreground_are_left_out(tmp_path, capsys):
    def sampling(path, hues: dict[str, float]) -> str:
        rows = {key: {"hue": value, "object_hue": value / 2, "coverage": 0.2, "psnr_to_object": 12.0, "hue_4px": value}
                for key, value in hues.items()}
        summary = {name: float(np.nanmean([row[name] for row in rows.values()])) for name in next(iter(rows.values()))}
        path.write_text(json.dumps({"generation": {**summary, "fid": 0.3, "per_object": rows}}))
        return str(path)
    before = {"a": 0.01, "b": 0.02, "c": float("nan"), "d": 0.03}
    after = {"a": 0.05, "b": 0.04, "c": 0.09, "d": 0.06}
    a, b = sampling(tmp_path / "before.json", before), sampling(tmp_path / "after.json", after)
    result = paired(json.loads(open(a).read()), json.loads(open(b).read()), "hue", task="generation")
    assert result["objects"] == 3 and result["mean"] == pytest.approx((0.04 + 0.02 + 0.03) / 3)
    assert main([a, b]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["generation hue", "generation object_hue",
                                                         "generation coverage", "generation psnr_to_object"]


def test_results_without_per_object_are_refused_with_a_message(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"generation": {"hue": 0.01, "fid": 0.3}}))
    assert main([str(old), str(old)]) == 2
    assert "without per_object" in capsys.readouterr().err
