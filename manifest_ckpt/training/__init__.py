"""Training states: an application state (modules, optimizers, schedulers, Stateful objects,
tensors and plain values) saved as one checkpoint, checked against live objects before any
of them is restored, and restored in place (docs/format.md §8).

- :mod:`~manifest_ckpt.training.tree`: the application state as the manifest's entry tree,
  both ways; shared with the distributed writer and reader.
- :mod:`~manifest_ckpt.training.optim`: optimizer state keyed by parameter name.
- :mod:`~manifest_ckpt.training.restore`: ``check`` and ``load`` of an application state.
- :mod:`~manifest_ckpt.training.plain`: ``load_file``, the state read without live objects.
- :mod:`~manifest_ckpt.training.rng`: :class:`RNGState`, the random generators as a Stateful.
"""
