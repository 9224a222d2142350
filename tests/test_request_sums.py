"""The compiled recorder's sums (``RequestSums`` in ``crowdmon/_speedups.c``): what the middleware
adds to them as requests start and finish, and what a drain hands the recorder.  Compiled only:
the Python request path records every request through the recorder's lists."""

from __future__ import annotations

import pytest

from crowdmon._speedups import RequestSums


def test_request_sums_take_only_registered_label_sets_of_exact_values() -> None:
    sums = RequestSums(("GET", "POST"), (0.1, 1.0), (10.0,), (1, 5, 8))
    cells = [0.0] * 11
    sums.register("GET", "/a", 200, cells, False)
    assert sums.add("GET", "/a", 200, 0.05, 3.0, 20.0)
    assert sums.add("".join(["G", "ET"]), "/a", 200, 2.0, 30.0, 5.0)  # another str object, same text
    assert not sums.add("POST", "/a", 200, 0.05, 3.0, 20.0)  # not registered
    assert not sums.add("GET", "/b", 200, 0.05, 3.0, 20.0)
    assert not sums.add("GET", "/a", "200", 0.05, 3.0, 20.0)  # not an int
    assert not sums.add(b"GET", "/a", 200, 0.05, 3.0, 20.0)
    assert sums.start("GET") and sums.start("POST") and not sums.start("PUT") and not sums.start(b"GET")
    assert cells == [0.0] * 11  # nothing reaches the cells before a drain
    assert sums.drain() == ({"GET": 1, "POST": 1}, {"GET": 2}, 0)
    # count | duration 0.1, 1.0, +Inf, sum | request 10, +Inf, sum | response 10, +Inf, sum
    assert cells == [2.0, 1.0, 0.0, 1.0, 2.05, 1.0, 1.0, 33.0, 1.0, 1.0, 25.0]
    assert sums.drain() == ({}, {}, 0)
    no_body = [0.0] * 11
    sums.register("GET", "/a", 204, no_body, True)
    for handler in (f"/h{n}" for n in range(100)):  # the table grows and keeps what it holds
        sums.register("GET", handler, 200, [0.0] * 11, False)
    assert sums.add("GET", "/a", 204, 0.5, 0.0, 99.0)
    assert sums.add("GET", "/a", 200, 0.5, 0.0, 1.0)
    assert sums.drain() == ({}, {"GET": 2}, 0)
    assert no_body == [1.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # the response size is 0
    assert cells[0] == 3.0
    with pytest.raises(TypeError, match="register"):
        sums.register("GET", "/a", 200, [0.0] * 3, False)  # fewer cells than the layout has
    with pytest.raises(ValueError, match="overlap"):
        RequestSums(("GET",), (0.1, 1.0), (10.0,), (1, 2, 8))


def test_a_drain_that_runs_out_of_memory_hands_everything_over_at_the_next() -> None:
    """Memory fails at each allocation of a drain in turn: whatever it did or did not hand over,
    the next drain hands over the rest, so the in-progress gauge (starts minus finishes) and the
    counts come out whole."""
    import _testcapi

    from crowdmon._recorder import _LAYOUT, STANDARD_METHODS

    methods = ("GET", "POST", "PUT")
    for failing in range(40):
        sums = RequestSums(STANDARD_METHODS, _LAYOUT.duration_bounds, _LAYOUT.size_bounds, (_LAYOUT.duration, _LAYOUT.request, _LAYOUT.response))
        cells = {method: [0.0] * _LAYOUT.width for method in methods}
        for method in methods:
            sums.register(method, f"/{method}", 200, cells[method], False)
            for _ in range(300):  # counts past the small ints Python keeps made
                assert sums.start(method) and sums.add(method, f"/{method}", 200, 0.1, 1.0, 1.0)
        _testcapi.set_nomemory(failing, failing + 1)
        try:
            first: tuple[dict[str, int], dict[str, int], int] = sums.drain()
            ran_out = False
        except MemoryError:
            first, ran_out = ({}, {}, 0), True
        finally:
            _testcapi.remove_mem_hooks()
        second = sums.drain()
        for method in methods:
            assert first[0].get(method, 0) + second[0].get(method, 0) == 300, (failing, method)
            assert first[1].get(method, 0) + second[1].get(method, 0) == 300, (failing, method)
            assert cells[method][0] == 300 - first[2], (failing, method)
        if not ran_out:
            assert failing > 0  # the first allocations did fail
            break
    else:
        raise AssertionError("every drain ran out of memory")
