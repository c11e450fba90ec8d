"""`wm.pynetdicom_patches.wake_promptly`: pynetdicom's loops nap until there is work, not a fixed 1 ms."""

from __future__ import annotations

import queue
import socket
import threading
from types import SimpleNamespace
from typing import Any

from wm.pynetdicom_patches import _Clock, _naps, _then, _Wake

NAP_S = 30.0  # far longer than any wake-up here: a nap that ends early was woken


def napping(nap: Any) -> threading.Event:
    """Run ``nap(NAP_S)`` in a thread; the event is set when it returns."""
    done = threading.Event()

    def run() -> None:
        nap(NAP_S)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_the_association_thread_wakes_when_a_message_is_queued() -> None:
    wake = _Wake()
    messages: queue.Queue[str] = queue.Queue()
    put = _then(messages.put, wake.reactor.set)
    done = napping(wake.reactor_nap)

    assert not done.wait(0.2), "it naps while nothing comes"
    put("C-STORE-RQ")

    assert done.wait(5), "the message woke it"
    assert messages.get_nowait() == "C-STORE-RQ"
    wake.close()


def test_the_dul_thread_wakes_for_data_from_its_peer_and_for_a_primitive_to_send() -> None:
    wake = _Wake()
    ours, peer = socket.socketpair()
    dul = SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=ours))))

    done = napping(lambda seconds: wake.dul_nap(dul, seconds))  # type: ignore[arg-type]
    assert not done.wait(0.2)
    peer.send(b"\x04")  # a P-DATA-TF arrives
    assert done.wait(5), "the peer's data woke it"
    ours.recv(1)

    done = napping(lambda seconds: wake.dul_nap(dul, seconds))  # type: ignore[arg-type]
    assert not done.wait(0.2)
    wake.wake_dul()  # the association thread queued a C-STORE-RSP
    assert done.wait(5), "the primitive to send woke it"

    wake.close()
    wake.wake_dul()  # after the DUL ended: nothing to wake, no error
    ours.close()
    peer.close()


def test_only_the_two_loops_nap_every_other_sleep_sleeps() -> None:
    clock = _Clock()
    calls: list[float] = []
    _naps.nap = calls.append
    try:
        clock.sleep(0.001)
    finally:
        _naps.nap = None
    clock.sleep(0.001)  # not a loop's thread: a plain sleep

    assert calls == [0.001]
    assert clock.monotonic() > 0, "the rest of the time module is there"
