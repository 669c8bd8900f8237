"""The RTT estimator and retransmission timeout (RFC 6298, SPEC §7.7), on their own."""

from __future__ import annotations

import pytest

from protocol.wan.rtt import RttEstimator


def test_before_any_sample_the_rto_is_the_initial_one() -> None:
    rtt = RttEstimator()
    assert (rtt.rto, rtt.srtt, rtt.min_rtt) == (1.0, None, None)
    assert RttEstimator(initial_rto=3.0).rto == 3.0


def test_first_sample_sets_srtt_and_half_of_it_as_variance() -> None:
    rtt = RttEstimator(min_rto=0.01)
    rtt.on_sample(0.1)
    assert rtt.srtt == pytest.approx(0.1)
    assert rtt.rttvar == pytest.approx(0.05)
    assert rtt.rto == pytest.approx(0.1 + 4 * 0.05)
    assert rtt.min_rtt == pytest.approx(0.1)


def test_later_samples_are_smoothed_by_one_eighth_and_one_quarter() -> None:
    rtt = RttEstimator(min_rto=0.01)
    rtt.on_sample(0.1)
    rtt.on_sample(0.3)
    rttvar = 3 / 4 * 0.05 + 1 / 4 * abs(0.1 - 0.3)
    srtt = 7 / 8 * 0.1 + 1 / 8 * 0.3
    assert rtt.rttvar == pytest.approx(rttvar)
    assert rtt.srtt == pytest.approx(srtt)
    assert rtt.rto == pytest.approx(srtt + 4 * rttvar)
    assert rtt.min_rtt == pytest.approx(0.1)


def test_granularity_floors_the_variance_term() -> None:
    rtt = RttEstimator(min_rto=0.001, granularity=0.5)
    for _ in range(50):
        rtt.on_sample(0.01)  # the variance decays towards 0
    assert rtt.rto == pytest.approx(0.01 + 0.5, abs=1e-3)


def test_the_rto_is_clamped_to_its_bounds() -> None:
    low = RttEstimator(min_rto=0.2)
    low.on_sample(0.001)
    assert low.rto == 0.2
    high = RttEstimator(max_rto=5.0)
    high.on_sample(10.0)
    assert high.rto == 5.0


def test_a_timeout_doubles_the_rto_up_to_its_maximum() -> None:
    rtt = RttEstimator(initial_rto=1.0, max_rto=5.0)
    rtt.on_timeout()
    assert rtt.rto == 2.0
    rtt.on_timeout()
    rtt.on_timeout()
    assert rtt.rto == 5.0


def test_progress_drops_the_backoff_only_once_there_is_an_estimate() -> None:
    rtt = RttEstimator(min_rto=0.01)
    rtt.on_timeout()
    rtt.reset_backoff()
    assert rtt.rto == 2.0  # no sample yet: the backed-off value stays
    rtt.on_sample(0.1)
    rtt.on_timeout()
    rtt.on_timeout()
    assert rtt.rto == pytest.approx(4 * 0.3)
    rtt.reset_backoff()
    assert rtt.rto == pytest.approx(0.3)  # from the estimate again


def test_note_min_feeds_only_the_minimum() -> None:
    rtt = RttEstimator(min_rto=0.01)
    rtt.on_sample(0.1)
    rtt.note_min(0.02)
    assert rtt.min_rtt == pytest.approx(0.02)
    assert rtt.srtt == pytest.approx(0.1)
    rtt.note_min(0.5)
    assert rtt.min_rtt == pytest.approx(0.02)


def test_negative_round_trips_count_as_zero() -> None:
    rtt = RttEstimator(min_rto=0.01)
    rtt.on_sample(-1.0)
    assert (rtt.srtt, rtt.min_rtt) == (0.0, 0.0)
    rtt.note_min(-2.0)
    assert rtt.min_rtt == 0.0


@pytest.mark.parametrize(
    ("initial", "low", "high"), [(1.0, 0.0, 60.0), (0.1, 0.2, 60.0), (90.0, 0.2, 60.0)]
)
def test_inconsistent_bounds_are_caller_errors(initial: float, low: float, high: float) -> None:
    with pytest.raises(ValueError):
        RttEstimator(initial_rto=initial, min_rto=low, max_rto=high)
