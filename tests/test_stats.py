"""raymem.stats: the false-positive rates the labeler's tests claim, measured by simulation."""

import numpy as np
import pytest

from raymem.stats import SD_FLOOR, bh_adjusted, paired_p, prediction_p


@pytest.mark.parametrize("n_null", [3, 4, 8])
def test_prediction_test_has_its_nominal_false_positive_rate_at_small_null_samples(n_null):
    rng = np.random.default_rng(n_null)
    trials, alpha, sd = 20_000, 0.05, 3.0  # sd well above the floor: the test's own calibration
    hits = 0
    for _ in range(trials):
        null = rng.normal(0, sd, n_null)
        hits += prediction_p(float(rng.normal(0, sd)), null).p <= alpha
    rate = hits / trials
    assert abs(rate - alpha) < 0.006, rate  # 3 s.e. of 20,000 Bernoulli(0.05) draws
    # what the old test did: z against the null's sample s.d. with the normal cut-off 1.645
    old = np.mean(
        [
            (rng.normal(0, sd) - (x := rng.normal(0, sd, n_null)).mean()) / max(x.std(ddof=1), SD_FLOOR) >= 1.645
            for _ in range(trials)
        ]
    )
    assert old > 0.075  # ~12 % at 4 null images: why the test changed


def test_paired_test_has_its_nominal_false_positive_rate_with_a_shared_seed_effect():
    rng = np.random.default_rng(0)
    trials, alpha, hits = 20_000, 0.05, 0
    for _ in range(trials):
        seed_effect = rng.normal(0, 5.0, 4)  # large, shared by the scan and null image of a seed
        scan = dict(enumerate(seed_effect + rng.normal(0, 3.0, 4)))
        null = dict(enumerate(seed_effect + rng.normal(0, 3.0, 4)))
        hits += paired_p(scan, null).p <= alpha
    assert abs(hits / trials - alpha) < 0.006


def test_paired_test_finds_a_real_shift_that_the_seed_effect_hides_from_an_unpaired_view():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 10.0, 4)
    null = dict(enumerate(seed_effect + rng.normal(0, 0.5, 4)))
    scan = dict(enumerate(seed_effect + 3.0 + rng.normal(0, 0.5, 4)))
    assert paired_p(scan, null).p < 0.01 and paired_p(scan, null).effect == pytest.approx(3.0, abs=1.0)
    assert prediction_p(float(np.mean(list(scan.values()))), list(null.values())).p > 0.2


def test_too_few_pairs_or_null_images_give_no_test():
    assert prediction_p(1.0, [0.0]) is None
    assert paired_p({0: 1.0, 1: 2.0}, {0: 0.0, 5: 1.0}) is None  # one shared seed


def test_benjamini_hochberg_matches_the_hand_computation():
    adjusted = bh_adjusted({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5, "e": None})
    assert adjusted["a"] == pytest.approx(0.04)
    assert adjusted["b"] == pytest.approx(0.04 * 4 / 3) and adjusted["c"] == pytest.approx(0.04 * 4 / 3)
    assert adjusted["d"] == pytest.approx(0.5) and adjusted["e"] is None
    assert bh_adjusted({}) == {}


def test_exact_and_prompt_clustered_intervals():
    from raymem.stats import clopper_pearson, cluster_bootstrap

    assert clopper_pearson(48, 48)[0] == pytest.approx(0.926, abs=1e-3) and clopper_pearson(48, 48)[1] == 1.0
    lo, hi = clopper_pearson(6, 24)
    assert lo == pytest.approx(0.098, abs=1e-3) and hi == pytest.approx(0.467, abs=1e-3)
    assert clopper_pearson(0, 0) is None
    # 24 images of 3 prompts: all of one prompt right, none of the others. By image 8/24 looks tight;
    # resampling prompts shows the recall could be anything from 0 to 2/3.
    clustered = cluster_bootstrap([8, 0, 0], [8, 8, 8])
    assert clustered[0] == 0.0 and clustered[1] >= 0.66
    exact = clopper_pearson(8, 24)
    assert clustered[1] - clustered[0] > exact[1] - exact[0]
