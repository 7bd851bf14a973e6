"""Probe rows for the paged caches' rewind (issue 24): ``PagedKVCache.crop``, ``BlockManager.truncate``,
``Engine.rewind``. Each bad input must be refused by a kvcourse ``raise`` naming what was expected and what came,
with nothing changed."""

from __future__ import annotations


def register(t) -> None:
    def engine_with(generated: int):
        """An engine holding request 'r' (prompt of 5) after ``generated`` steps (one token each)."""
        def make():
            eng = t.engine(num_blocks=8, block_size=4)
            eng.add_request(request_id="r", prompt=[1, 2, 3, 4, 5], max_new_tokens=4)
            for _ in range(generated):
                eng.step()
            return eng
        return make

    def finished():
        eng = engine_with(0)()
        while eng.has_unfinished():
            eng.step()
        return eng

    # -- PagedKVCache.crop: the batch's sequences, KVCache.crop's semantics, all or nothing
    t.probe("paged.PagedKVCache.crop", "past the length", t.on(lambda: t.paged(t=3), "crop", 4),
            names=("crop(4)", "holds 3", "'a'"))
    t.probe("paged.PagedKVCache.crop", "below -length", t.on(lambda: t.paged(t=3), "crop", -4),
            names=("crop(-4)", "-1..-3"))
    t.probe("paged.PagedKVCache.crop", "a float", t.on(lambda: t.paged(t=3), "crop", 1.5), names=("int", "1.5"))
    t.probe("paged.PagedKVCache.crop", "a bool", t.on(lambda: t.paged(t=3), "crop", True), names=("int", "True"))
    t.probe("paged.PagedKVCache.crop", "the middle of a step", lambda: (lambda c: (
        (lambda: c.crop(-1)), (c,)))((lambda c: (c.update(*t.kv(), 0), c)[1])(t.paged(t=3))),
            names=("middle of a step", "[6, 3]", "0..3"))
    t.probe("paged.PagedKVCache.crop", "drop 1 of 3", t.on(lambda: t.paged(t=3), "crop", -1),
            result=lambda r: r is None)

    # -- BlockManager.truncate: keep 0..num_computed_tokens of a request's tokens
    t.probe("serve.BlockManager.truncate", "more than computed", lambda: (lambda bm, r: (
        (lambda: bm.truncate(r, 10)), (bm, r)))(*t.admitted()), names=("'r'", "0..9", "10"))
    t.probe("serve.BlockManager.truncate", "negative", lambda: (lambda bm, r: (
        (lambda: bm.truncate(r, -1)), (bm, r)))(*t.admitted()), names=("0..9", "-1"))
    t.probe("serve.BlockManager.truncate", "a float", lambda: (lambda bm, r: (
        (lambda: bm.truncate(r, 4.0)), (bm, r)))(*t.admitted()), names=("int", "4.0"))
    t.probe("serve.BlockManager.truncate", "a table from another pool", lambda: (lambda bm, r: (
        (lambda: t.bman(num_blocks=2).truncate(r, 1)), (bm, r)))(*t.admitted()), names=("'r'", "another pool"))
    t.probe("serve.BlockManager.truncate", "keep 5 of 9", lambda: (lambda bm, r: (
        (lambda: (bm.truncate(r, 5), (r.num_computed_tokens, len(r.block_table), bm.num_used_blocks))[1]),
        (bm, r)))(*t.admitted()), result=lambda r: r == (5, 2, 2))

    # -- Engine.rewind: an unfinished request's generated tokens, never the prompt
    t.probe("serve.Engine.rewind", "unknown id", t.on(engine_with(1), "rewind", "zz", 1), names=("'zz'", "'r'"))
    t.probe("serve.Engine.rewind", "an unhashable id", t.on(engine_with(1), "rewind", ["r"], 1), names=("['r']",))
    t.probe("serve.Engine.rewind", "nothing generated yet", t.on(engine_with(0), "rewind", "r", 1),
            names=("'r'", "no token", "prompt"))
    t.probe("serve.Engine.rewind", "more than generated", t.on(engine_with(2), "rewind", "r", 3),
            names=("'r'", "generated 2", "1..2", "3"))
    t.probe("serve.Engine.rewind", "zero", t.on(engine_with(2), "rewind", "r", 0), names=("1..2", "0"))
    t.probe("serve.Engine.rewind", "a float", t.on(engine_with(2), "rewind", "r", 1.0), names=("int", "1.0"))
    t.probe("serve.Engine.rewind", "a finished request", t.on(finished, "rewind", "r", 1), names=("'r'", "finished"))
    t.probe("serve.Engine.rewind", "one of two", lambda: (lambda e: (
        (lambda: (e.rewind("r", 1), (e.requests["r"].output, e.requests["r"].num_computed_tokens))[1]), (e,)))(
            engine_with(2)()), result=lambda r: len(r[0]) == 1 and r[1] == 5)
