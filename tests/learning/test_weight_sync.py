"""The weight fingerprint: what it catches, what it does not depend on; the broadcast group's
rendezvous and its abort (pure CPU, no actors)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from cir_actors.learning.weight_sync import (
    FINGERPRINT_SAMPLES,
    BroadcastAborted,
    BroadcastSender,
    StreamingFingerprint,
    TensorSpec,
    abort_broadcast,
    fingerprint,
    group_address,
    receive_broadcast,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(512, 300, generator=g),  # > FINGERPRINT_SAMPLES: sampled
        "layer.bias": torch.randn(300, generator=g),  # small: hashed whole
        "norm.weight": torch.ones(300),
    }


def test_fingerprint_is_order_free_streamable_and_layout_free():
    sd = _state()
    fp = fingerprint(sd.items())
    assert fingerprint(reversed(list(sd.items()))) == fp
    for executor in (None, ThreadPoolExecutor(2)):  # hashed in the caller's thread or beside it
        stream = StreamingFingerprint(executor)
        for name, t in sd.items():
            stream.add(name, t)
        assert stream.digest() == fp
    # the same values in a non-contiguous tensor (a transposed copy transposed back)
    odd = dict(sd, **{"embed.weight": sd["embed.weight"].t().contiguous().t()})
    assert not odd["embed.weight"].is_contiguous() and fingerprint(odd.items()) == fp
    # independent of the thread count (no floating-point reductions)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fingerprint(sd.items()) == fp
    finally:
        torch.set_num_threads(threads)


def test_fingerprint_catches_versions_names_shapes_dtypes_and_corrupted_stretches():
    sd = _state()
    fp = fingerprint(sd.items())
    stepped = {k: v - 1e-4 * torch.sign(v + 0.5) for k, v in sd.items()}  # an optimizer-like step
    assert fingerprint(stepped.items()) != fp
    assert fingerprint({("x." + k): v for k, v in sd.items()}.items()) != fp
    assert fingerprint(dict(sd, **{"layer.bias": sd["layer.bias"].reshape(3, 100)}).items()) != fp
    assert fingerprint(dict(sd, **{"norm.weight": sd["norm.weight"].bfloat16()}).items()) != fp
    swapped = dict(sd, **{"layer.bias": sd["norm.weight"], "norm.weight": sd["layer.bias"]})
    assert fingerprint(swapped.items()) != fp
    # any single element of a small tensor; any stretch of a large one longer than the stride
    small = {k: v.clone() for k, v in sd.items()}
    small["layer.bias"][123] += 1e-6
    assert fingerprint(small.items()) != fp
    stride = -(-sd["embed.weight"].numel() // FINGERPRINT_SAMPLES)
    for start in (0, 777, sd["embed.weight"].numel() - stride):
        big = {k: v.clone() for k, v in sd.items()}
        big["embed.weight"].view(-1)[start : start + stride] = 0.0
        assert fingerprint(big.items()) != fp, start


def test_a_group_still_forming_is_aborted_at_once_for_every_member_waiting():
    """Two receivers expected, one joins: the sender and that receiver wait in the rendezvous
    (before any collective could block on the missing one) until `abort_broadcast` ends it for
    both with the reason; then they have raised within a second, not at the group's 60 s deadline."""
    sender = BroadcastSender(2, timeout_s=60)
    t = torch.arange(6, dtype=torch.float32)
    specs = [TensorSpec("w", "float32", (6,))]
    errors: dict[str, BaseException] = {}

    def send():
        try:
            sender.send(1, specs, [t])
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            errors["sender"] = e

    def receive():
        try:
            list(receive_broadcast(SimpleNamespace(broadcast_group=sender.address, version=1), rank=1, timeout_s=60))
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            errors["receiver"] = e

    threads = [threading.Thread(target=send), threading.Thread(target=receive)]
    for th in threads:
        th.start()
    time.sleep(1.0)
    assert not errors and all(th.is_alive() for th in threads)  # both waiting for the second receiver
    t0 = time.monotonic()
    assert abort_broadcast(sender.address, "generator-1 is being replaced")
    for th in threads:
        th.join(timeout=30)
    assert time.monotonic() - t0 < 10  # at once, not at the rendezvous' 60 s deadline (slack: a loaded machine)
    assert set(errors) == {"sender", "receiver"}, errors
    for e in errors.values():
        assert isinstance(e, BroadcastAborted) and "generator-1 is being replaced" in str(e)
    sender.close()


def test_aborting_a_group_whose_sender_is_gone_says_so():
    assert not abort_broadcast(group_address("gloo", "127.0.0.1", 1, 3), "nobody there", timeout_s=1.0)
    with pytest.raises(ValueError, match="not of the form"):
        abort_broadcast("tcp://x", "bad address")
