"""``gc_paused``: no cyclic garbage collection while 100,000 entries are built (no torch).

Reading, checking, loading or saving a mixture-of-experts checkpoint allocates millions of
small acyclic objects (dicts, lists, strings, tuples). Left on, the collector traverses them
again and again as they age through its generations, only to free nothing: it doubles the
time of a parse. So the hot paths pause it, and on the way out hand what they allocated
straight to the oldest generation (``gc.freeze`` then ``gc.unfreeze``, two list splices),
instead of letting the first collection after ``gc.enable`` traverse all of it, then the
next generation's, then a full collection of the whole process, a model's own objects
included. Cyclic garbage made meanwhile is still found, by the next full collection.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC for the block (nested or decorating: only the outermost resumes it)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()  # everything tracked moves to the permanent generation ...
            gc.unfreeze()  # ... and from there to the oldest one, untraversed
            gc.enable()
