"""The simulator's shared arrays, as tests/conftest.py serializes their creation.

numba-cuda's simulator makes a block's ``cuda.shared.array`` at the first call on its
line with a check-then-set that is not atomic; two threads of one block racing there can
each get an array of their own (reproduced: 3 of 200 trials below with the unpatched
method), and a block reduction then mixes two buffers.  This checks that every thread of
a block gets the one array, with thread switches forced as often as Python allows.
"""
import os
import sys
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.cuda


def _arrays_seen(threads=16):
    from numba.cuda.simulator import kernelapi
    shared = kernelapi.FakeCUDAShared(0)
    got = [None] * threads
    start = threading.Barrier(threads)

    def work(k):
        start.wait()
        got[k] = shared.array(8, np.float64)  # one line, as in a kernel: one array per block

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len({id(a) for a in got})


def test_every_thread_of_a_block_gets_the_same_shared_array():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("the simulator's shared arrays (a GPU has real ones)")
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        seen = [_arrays_seen() for _ in range(200)]
    finally:
        sys.setswitchinterval(saved)
    assert max(seen) == 1, f"{sum(n > 1 for n in seen)} of 200 blocks saw several shared arrays"
