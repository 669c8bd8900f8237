"""otad's firmware-distribution protocol, sans-IO. ``protocol/SPEC.md`` is the normative copy.

Nothing here does I/O, reads a clock or starts a task (``tests/protocol/test_import_boundary.py``
enforces it): the machines are fed what arrived and what time it is, and they return what to do.
The subpackages follow SPEC:

* :mod:`protocol.wire` -- MQTT level, topics, messages and their codec (SPEC §1-§3);
* :mod:`protocol.errors` -- the reason codes (§4);
* :mod:`protocol.release` -- COSE, manifests, trust, image files (§6);
* :mod:`protocol.wan` -- the WAN transfer otad ⇄ Communications Hub (§7);
* :mod:`protocol.han` -- the HAN transfer CH ⇄ HAN device, ZigBee OTA Upgrade (§8.1-§8.5);
* :mod:`protocol.device` -- the device's slots, checks and signed activation (§8.6-§8.8);
* :mod:`protocol.clock` and :mod:`protocol.transitions` -- the two clocks, the edge check.

Driving a machine
-----------------

The five machines share one convention, so a shell drives each the same way:

* **inputs** are past-tense methods named ``*_received(..., now)``, ``now`` last, on the
  machine's clock (:mod:`protocol.clock`); untrusted input that cannot be applied raises
  :class:`~protocol.errors.ProtocolError` and changes nothing;
* **one timer**: arm it at ``next_deadline()`` (``None``: no timer), call ``handle_timer(now)``
  when it fires (early or late calls are harmless);
* **outcomes** (past-tense events for the shell's bookkeeping) are drained with ``events()``,
  oldest first, by the machines that have any.

What each takes and returns, its clock, and the shell that drives it:

* :class:`~protocol.wan.sender.Sender` (otad, one per (CH, image); Monotonic; driven by
  ``otad/distribution.py``) takes ``message_received(msg, now)``, ``cancel(now)`` and
  ``handle_timer(now)``, which return nothing: the shell pulls ``next_actions(now, budget)``
  (SendOffer, SendBlock, SendPoll, SendCancel) and drains ``events()`` (ProgressMade,
  TransferCompleted, TransferFailed).
* :class:`~protocol.wan.receiver.Receiver` (a CH, all its images; Monotonic; driven by the
  virtual CH ``loadtest/hub.py``) takes ``message_received(msg, now)``,
  ``image_hashed(image, sha256, now)`` (the answer to its VerifyImage) and
  ``handle_timer(now)``; each returns the actions to carry out (Reply, StoreBlock, VerifyImage,
  DiscardImage).
* :class:`~protocol.han.server.HanServer` (a CH; UnixTime; no shell yet, issue 9 builds it)
  takes ``frame_received(peer, data, now)`` and ``handle_timer(now)``, which return the frames
  to send as ``(peer, bytes)``; ``events()`` drains SessionStarted, ImageDelivered,
  SessionFailed, SessionTimedOut.
* :class:`~protocol.han.client.HanClient` (one per device; UnixTime; no shell yet, issue 9)
  takes ``start(now)``, ``frame_received(data, now)`` and ``handle_timer(now)``, which return
  the frames to send; ``events()`` drains ImageOffered, ManifestAccepted, ManifestRejected,
  ImageReceived, DownloadAborted, UpgradeEndAcknowledged. It feeds its device.
* :class:`~protocol.device.device.Device` (one per device; UnixTime; driven by its HanClient and,
  for activation, by a shell issue 9 builds) takes ``manifest_received(signed, now)`` (returns
  the verified Manifest), ``image_data_received(offset, data)`` (returns the next offset
  expected), ``activation_received(signed, now)`` and ``handle_timer(now)`` (return the answers
  to send back: ActivationResponse, ActivationScheduled, ActivationCancelled, AlertRaised (an
  ActivationAlert) or VersionReport).

Two departures, each for a reason:

* The **Sender is pull-style** (like aioquic's ``QuicConnection``): what it may send depends on
  the budget the daemon's scheduler grants across thousands of transfers (blocks per tick, the
  per-CH window), which the Sender cannot know when a message arrives. So inputs only change
  its state, and the shell asks ``next_actions(now, budget)`` when it has budget to spend. The
  other machines answer each input at once: a CH or a device has nobody to share with.
* ``Device.image_data_received`` takes no ``now``: a block is checked against its signed hash,
  and no clock is involved (a parameter the device never read would suggest otherwise).

The WAN machines run on :data:`~protocol.clock.Monotonic` (round trips and timeouts are
differences); the HAN machines and the device on :data:`~protocol.clock.UnixTime`, because
they check signed, dated data (SPEC §8.1 for how frames carry it).
"""
