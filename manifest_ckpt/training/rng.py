"""``RNGState``: the process's random generators as one Stateful entry of an application state."""

from __future__ import annotations

import random
from typing import Any

import torch


class RNGState:
    """Captures and restores the global random generators, so a resume draws the same numbers.

    Saved with the rest of the application state (``{"model": m, "optim": o, "rng":
    mc.RNGState()}``): the torch CPU generator, CUDA generators where CUDA is available,
    Python's ``random`` and NumPy's legacy global generator where NumPy is installed. The
    state is taken when the checkpoint is saved, and set when it is loaded. A checkpoint from
    a machine with CUDA loaded where there is none reports ``rng.cuda`` as unexpected
    (allow it with ``allow_unexpected=["rng.cuda"]``).
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        }
        numpy = _numpy()
        if numpy is not None:
            name, keys, pos, has_gauss, cached = numpy.random.get_state(legacy=True)
            state["numpy"] = {
                "name": name,
                "keys": [int(k) for k in keys],
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        if torch.cuda.is_available():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        numpy = _numpy()
        if numpy is not None and "numpy" in state:
            n = state["numpy"]
            keys = numpy.array(n["keys"], dtype=numpy.uint32)
            numpy.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return None
    return numpy
