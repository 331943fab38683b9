"""The default batch size grows toward the ceiling for fast handlers and
stays small for slow ones, so a batch never outlives its lease."""

from __future__ import annotations

from conveyor.runtime._worker import BATCH_SECONDS, FIRST_BATCH, _Sizer


def test_a_fast_handler_doubles_from_the_first_batch_up_to_the_ceiling() -> None:
    sizer = _Sizer(256)
    sizes = [sizer.size]
    for _ in range(6):
        sizer.took(sizer.size * 20e-6, sizer.size)  # 20 us a message, every batch full
        sizes.append(sizer.size)
    assert sizes == [FIRST_BATCH, 32, 64, 128, 256, 256, 256]


def test_a_slow_handler_gets_as_many_as_fit_in_the_batch_budget() -> None:
    sizer = _Sizer(256)
    for _ in range(20):
        sizer.took(sizer.size * 0.005, sizer.size)  # 5 ms a message
    assert sizer.size == int(BATCH_SECONDS / 0.005)
    for _ in range(20):
        sizer.took(sizer.size * 2.0, sizer.size)  # 2 s a message
    assert sizer.size == 1


def test_partial_batches_do_not_grow_the_size_and_the_ceiling_holds() -> None:
    sizer = _Sizer(8)
    assert sizer.size == 8
    sizer.took(1e-5 * 3, 3)
    assert sizer.size == 8
    small = _Sizer(256)
    small.took(1e-5, 1)  # a near-empty queue: one message at a time
    assert small.size == FIRST_BATCH
