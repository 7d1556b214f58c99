"""``init_empty``: build a module without allocating its weights, ready for ``load``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

_LOCK = threading.RLock()


@contextmanager
def init_empty() -> Iterator[None]:
    """Build modules with parameters and persistent buffers on the meta device, the rest real.

    The way to build a big model before loading it: nothing the checkpoint holds is
    allocated (each parameter is created, then at once replaced by a meta tensor of its
    shape, dtype and class), while non-persistent buffers, which no checkpoint holds (a
    rotary embedding's ``inv_freq``), are computed as usual. ``load`` then materialises every
    meta tensor from the checkpoint (on ``device=``)::

        with mc.init_empty():
            model = LlamaForCausalLM(config)
        mc.load(model, "ckpt", device="cuda")

    This is accelerate's ``init_empty_weights(include_buffers=False)``, with persistent
    buffers on meta as well. ``nn.Module.register_parameter`` and ``register_buffer`` are
    patched while the block runs (in every thread, as accelerate does); one block at a time.
    """
    with _LOCK:
        register_parameter = nn.Module.register_parameter
        register_buffer = nn.Module.register_buffer

        def parameter_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
            register_parameter(self, name, param)
            if param is not None and not param.is_meta and not is_lazy(param):  # lazy: no shape yet
                kwargs: dict[str, Any] = dict(param.__dict__)
                kwargs["requires_grad"] = param.requires_grad
                self._parameters[name] = type(param)(param.to("meta"), **kwargs)

        def persistent_buffer_on_meta(
            self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
        ) -> None:
            register_buffer(self, name, tensor, persistent)
            if persistent and tensor is not None and not tensor.is_meta:
                self._buffers[name] = tensor.to("meta")

        nn.Module.register_parameter = parameter_on_meta  # type: ignore[method-assign]
        nn.Module.register_buffer = persistent_buffer_on_meta  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
            nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
