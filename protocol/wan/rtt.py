"""Round-trip time estimation and the retransmission timeout (RFC 6298), with a minimum RTT.

Theory of operation
-------------------

The caller measures round trips (send time to acknowledgement time) and feeds them to
:meth:`RttEstimator.on_sample`; it must follow Karn's rule and never sample a block it sent more
than once (the acknowledgement could be for either copy). The estimator keeps::

    first sample R:   srtt = R,  rttvar = R / 2
    later samples R:  rttvar = 3/4 rttvar + 1/4 |srtt - R|,   srtt = 7/8 srtt + 1/8 R
    rto = clamp(srtt + max(granularity, 4 rttvar), min_rto, max_rto)

Before the first sample ``rto`` is ``initial_rto``. Every expiry of the retransmission timer calls
:meth:`on_timeout`, which doubles ``rto`` (up to ``max_rto``); the backed-off value is kept until a
new valid sample recomputes it (RFC 6298 5.5-5.7) or the caller sees progress and calls
:meth:`reset_backoff` (as QUIC does). ``min_rtt`` (the smallest sample seen) is what
the sender's reordering window and its spurious-repair check are scaled by.
"""

from __future__ import annotations


class RttEstimator:
    """Smoothed RTT, RTT variance, minimum RTT and the current retransmission timeout."""

    __slots__ = (
        "granularity",
        "last_sample",
        "max_rto",
        "min_rto",
        "min_rtt",
        "rto",
        "rttvar",
        "samples",
        "srtt",
    )

    ALPHA = 1 / 8
    BETA = 1 / 4
    K = 4

    def __init__(
        self,
        *,
        initial_rto: float = 1.0,
        min_rto: float = 0.2,
        max_rto: float = 60.0,
        granularity: float = 0.001,
    ) -> None:
        if not 0 < min_rto <= initial_rto <= max_rto:
            raise ValueError("need 0 < min_rto <= initial_rto <= max_rto")
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        self.rto = initial_rto
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.min_rtt: float | None = None
        self.samples = 0  # measurements folded in
        self.last_sample = 0.0  # the newest of them, seconds

    def on_sample(self, rtt: float) -> None:
        """Fold in one round-trip measurement (seconds) and recompute ``rto``."""
        rtt = max(rtt, 0.0)
        self.samples += 1
        self.last_sample = rtt
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        self.reset_backoff()

    def reset_backoff(self) -> None:
        """New data was acknowledged: drop the backoff, ``rto`` from the estimate again.

        RFC 6298 keeps a backed-off RTO until a sample from a block sent once arrives; when every
        acknowledgement is for a repair (the tail of a lossy transfer) that never happens and
        the timeout grows without bound while the transfer is making progress. Like QUIC
        (RFC 9002 6.2.1, the PTO backoff is reset on an acknowledgement), progress resets it.
        Without any sample yet, the backed-off value stays."""
        if self.srtt is None:
            return
        rto = self.srtt + max(self.granularity, self.K * self.rttvar)
        self.rto = min(max(rto, self.min_rto), self.max_rto)

    def note_min(self, rtt: float) -> None:
        """Record a round trip that only feeds ``min_rtt`` (not the smoothed estimate)."""
        rtt = max(rtt, 0.0)
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)

    def on_timeout(self) -> None:
        """The retransmission timer expired: back off exponentially."""
        self.rto = min(self.rto * 2, self.max_rto)
