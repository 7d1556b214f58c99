"""``manifest_ckpt.lightning.ManifestCheckpointIO``: see :mod:`manifest_ckpt.integrations.lightning`.

Importing this module imports the ``lightning`` package (``pip install 'manifest-ckpt[lightning]'``).
"""

from __future__ import annotations

from manifest_ckpt.integrations.lightning import ManifestCheckpointIO

__all__ = ["ManifestCheckpointIO"]
