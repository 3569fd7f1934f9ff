"""The in-distribution signal: scores of networks against the zoo's validation networks."""

import numpy as np
import pytest

from sane_hf.downstream.features import split_tokens
from sane_hf.downstream.ood import SIGNALS, InDistributionReference


@pytest.fixture(scope="module")
def reference(zoo, sane):
    return InDistributionReference.fit(sane, zoo)


def test_the_zoos_validation_networks_lie_inside_and_scaled_ones_outside(zoo, sane, reference):
    tokens, positions, mask = split_tokens(zoo["validation"])
    inside = reference.assess(reference.scores(sane, tokens, positions, mask))
    assert not inside.outside.any()  # the reference's own networks: at most its largest score
    for name in SIGNALS:
        assert (inside.percentiles[name] <= 100).all()
        assert inside.percentiles[name].min() == 0  # the best-matching validation network
    # every weight shifted by 5 zoo standard deviations lies outside the zoo's range
    shifted = tokens + 5 * mask
    outside = reference.assess(reference.scores(sane, shifted, positions, mask))
    assert outside.outside.all()
    assert outside.reasons(0) == list(SIGNALS)
    columns = outside.columns()
    assert columns["outside_zoo_range"].all()
    assert set(columns) == {f"{name}_percentile" for name in SIGNALS} | {"outside_zoo_range"}


def test_reference_round_trip_and_missing_files(zoo, sane, reference, tmp_path):
    reference.save_pretrained(tmp_path)
    loaded = InDistributionReference.from_pretrained(tmp_path)
    tokens, positions, mask = split_tokens(zoo["test"])
    scores = reference.scores(sane, tokens, positions, mask)
    again = loaded.scores(sane, tokens, positions, mask)
    for name in SIGNALS:
        np.testing.assert_allclose(again[name], scores[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            loaded.validation_scores[name], reference.validation_scores[name]
        )
    assert InDistributionReference.from_pretrained(tmp_path / "elsewhere") is None
