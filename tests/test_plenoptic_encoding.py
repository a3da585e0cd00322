"""The Plenoptic-Encoding experiment's statistics: paired per-object differences with t intervals."""

from __future__ import annotations

import numpy as np
from scipy import stats

from model_zoo.plenoptic_encoding import QUICK, FULL, Run, compare, goembed, paired


def test_paired_interval_is_the_paired_t_interval():
    rng = np.random.default_rng(0)
    b = rng.normal(15, 2, size=40)
    a = b + rng.normal(0.3, 0.5, size=40)
    result = paired({str(i): [v] for i, v in enumerate(a)}, {str(i): [v] for i, v in enumerate(b)})
    reference = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert result["objects"] == 40
    np.testing.assert_allclose(result["delta_psnr"], np.mean(a - b), atol=1e-3)
    np.testing.assert_allclose(result["ci95"], [reference.low, reference.high], atol=1e-3)


def test_seeds_are_averaged_per_object_before_pairing_and_only_shared_objects_count():
    a = {"x": [10.0, 12.0], "y": [20.0, 20.0], "only_a": [99.0]}
    b = {"x": [10.0], "y": [19.0], "only_b": [0.0]}
    result = paired(a, b)
    assert result["objects"] == 2 and result["delta_psnr"] == 1.0  # (11 - 10 + 20 - 19) / 2


def test_every_goembed_row_is_compared_with_unprojection_and_zeros_of_its_representation():
    rng = np.random.default_rng(1)
    per_object = {run: {str(i): [float(rng.normal(15, 1))] for i in range(8)} for run in FULL}
    comparisons = compare(FULL, per_object, seeds=1)
    goembed_rows = [r for r in FULL if r.encoder == "goembed"]
    expected = sum(2 if r.representation != "mlp" else 1 for r in goembed_rows)  # the MLP has no unprojection
    assert len(comparisons) == expected
    first = comparisons[0]
    assert set(first) >= {"a", "b", "delta_psnr", "ci95", "objects"} and first["objects"] == 8
    assert first["a"] == goembed("triplane").key() and first["b"] == Run("triplane", "unprojection").key()
    assert set(QUICK) <= set(FULL)
