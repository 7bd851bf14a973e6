"""Probe rows for rewinding the ring and the int8 cache (issue 24): ``crop`` and the ``rewind`` argument.

Registered by tests/test_probes.py, which imports every tests/probes_*.py and calls ``register`` with itself.
"""

from __future__ import annotations


def _ring(t, seen: int, window: int = 4, rewind: int = 0):
    """A 2-layer ring (window 4) after one write of ``seen`` tokens."""
    return t.filled(t.mod("window").SlidingWindowCache(2, 1, 2, 8, window, rewind=rewind), t=seen)


def _int8_flushed(t):
    """residual=2: a 3-token prefill (int8), then 2 tokens that flush: quantized 5, last flush from 3."""
    c = t.filled(t.mod("quant").Int8KVCache(2, 1, 2, 8, 8, residual=2), t=3)
    k, v = t.kv(t=2)
    for layer in range(2):
        c.update(k, v, layer)
    return c


def _then(make, method: str, *a, read=lambda c: None):
    """setup for ``make().method(*a)`` returning ``read(obj)`` afterwards (what the call left behind)."""
    def setup():
        obj = make()
        return (lambda: (getattr(obj, method)(*a), read(obj))[1]), (obj,)
    return setup


def _split(c):
    """(quantized, in_residual) per layer: where the int8 cache holds its tokens."""
    return c.quantized, c.in_residual


def register(t) -> None:
    probe, on, call, mod = t.probe, t.on, t.call, t.mod
    # -- window ---------------------------------------------------------------------------------------------
    probe("window.SlidingWindowCache", "negative rewind",
          call(lambda: mod("window").SlidingWindowCache(2, 1, 2, 8, 4, rewind=-1)), names=("rewind", "-1"))
    probe("window.SlidingWindowCache", "bool rewind",
          call(lambda: mod("window").SlidingWindowCache(2, 1, 2, 8, 4, rewind=True)), names=("rewind", "True"))
    probe("window.SlidingWindowCache", "rewind=3: 6 slots",
          call(lambda: mod("window").SlidingWindowCache(2, 1, 2, 8, 4, rewind=3)),
          result=lambda c: c.slots == 6 and c.keys[0].shape == (1, 2, 6, 8) and c.window == 4)
    probe("window.SlidingWindowCache.for_model", "rewind given",
          call(lambda: mod("window").SlidingWindowCache.for_model(t.mistral(), 1, rewind=2)),
          result=lambda c: c.slots == 5 and c.window == 4)
    probe("window.SlidingWindowCache.for_model", "float rewind",
          call(lambda: mod("window").SlidingWindowCache.for_model(t.mistral(), 1, rewind=1.5)),
          names=("rewind", "1.5"))
    crop = "window.SlidingWindowCache.crop"
    probe(crop, "float", on(lambda: _ring(t, 3), "crop", 1.5), names=("1.5",))
    probe(crop, "bool", on(lambda: _ring(t, 3), "crop", True), names=("True",))
    probe(crop, "negative past the length", on(lambda: _ring(t, 3), "crop", -4), names=("-4", "3"))
    probe(crop, "past the length", on(lambda: _ring(t, 3), "crop", 9), names=("9", "3"))
    probe(crop, "two tokens from a wrapped plain ring", on(lambda: _ring(t, 9), "crop", -2),
          names=("crop(-2)", "holds 9", "keep 7", "positions 4..6", "oldest position still held is 5",
                 "rewind=k", "k >= 2"))
    probe(crop, "one token from a wrapped plain ring", _then(lambda: _ring(t, 9), "crop", -1, read=lambda c: c.lengths),
          result=lambda r: r == [8, 8])
    probe(crop, "rewind=3 drops 3, not 4", on(lambda: _ring(t, 12, rewind=3), "crop", 8), names=("crop(8)", "k >= 4"))
    probe(crop, "rewind=3 drops 3", _then(lambda: _ring(t, 12, rewind=3), "crop", -3, read=lambda c: c.lengths),
          result=lambda r: r == [9, 9])
    probe(crop, "to 0 after the ring wrapped", _then(lambda: _ring(t, 9), "crop", 0, read=lambda c: c.lengths),
          result=lambda r: r == [0, 0])
    probe(crop, "before the ring wrapped: back to 1", _then(lambda: _ring(t, 3), "crop", 1, read=lambda c: c.lengths),
          result=lambda r: r == [1, 1])
    # -- quant ----------------------------------------------------------------------------------------------
    probe("quant.Int8KVCache", "bool residual", call(lambda: mod("quant").Int8KVCache(2, 1, 2, 8, 8, residual=True)),
          names=("residual", "True"))
    crop = "quant.Int8KVCache.crop"
    probe(crop, "float", on(lambda: _int8_flushed(t), "crop", 2.5), names=("2.5",))
    probe(crop, "bool", on(lambda: _int8_flushed(t), "crop", False), names=("False",))
    probe(crop, "negative past the length", on(lambda: _int8_flushed(t), "crop", -6), names=("-6", "5"))
    probe(crop, "past the length", on(lambda: _int8_flushed(t), "crop", 6), names=("6", "5"))
    probe(crop, "into tokens an earlier flush quantized", on(lambda: _int8_flushed(t), "crop", 2),
          names=("crop(2)", "holds 5", "keep 2", "3..5", "residual=2", "residual=k"))
    probe(crop, "into the last flush, short of a flush: exact residual",
          _then(lambda: _int8_flushed(t), "crop", 4, read=_split), result=lambda r: r == ([3, 3], [1, 1]))
    probe(crop, "into the prefill", _then(lambda: t.filled(t.kvcache("Int8KVCache"), t=3), "crop", 2, read=_split),
          result=lambda r: r == ([2, 2], [0, 0]))
    probe(crop, "to 0 after two flushes", _then(lambda: _int8_flushed(t), "crop", 0, read=_split),
          result=lambda r: r == ([0, 0], [0, 0]))
    probe(crop, "residual=0, back past every flush",
          _then(lambda: t.filled(t.filled(mod("quant").Int8KVCache(2, 1, 2, 8, 8, residual=0), t=3), t=2), "crop", 1,
                read=_split), result=lambda r: r == ([1, 1], [0, 0]))
