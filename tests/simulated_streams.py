"""Streams for the CUDA simulator, which has none: a stand-in stream object with a
handle, and device arrays whose ``__cuda_array_interface__`` (version 3) names a
stream (tests/test_cuda_streams.py, tests/test_cuda_scratch.py)."""
import numpy as np

CALLER_STREAM = 0x7001  # the handle the caller's arrays name
OTHER_STREAM = 0x7002  # another stream, that one input was written on


class FakeStream:
    """A stream of the simulator's: records waits for the host."""

    def __init__(self, handle):
        self.handle = handle
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


def stream_array(host, handle):
    """A simulator device array whose interface names the stream ``handle``."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    class StreamArray(FakeCUDAArray):
        @property
        def __cuda_array_interface__(self):
            return {"shape": self._ary.shape, "typestr": self._ary.dtype.str, "version": 3,
                    "data": (self._ary.__array_interface__["data"][0], False),
                    "strides": None if self._ary.flags.c_contiguous else self._ary.strides,
                    "stream": handle}

    return StreamArray(np.array(host))
