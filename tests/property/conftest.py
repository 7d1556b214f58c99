"""Hypothesis profiles for the property suites, and a per-test count of examples run.

``ci`` (the default) keeps the whole suite within a few minutes on two cores; ``deep``
(``MANIFEST_CKPT_HYPOTHESIS_PROFILE=deep``) runs 25 times as many examples.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

from .strategies import EXAMPLES

PROFILE_ENV = "MANIFEST_CKPT_HYPOTHESIS_PROFILE"
CI_EXAMPLES = 200
DEEP_FACTOR = 25

# Building modules and writing checkpoints takes milliseconds per example, more on a loaded CI
# machine: a deadline would only make the suite flaky. Generated architectures are rejected
# now and then (assume), which is expected, not a strategy defect.
_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=CI_EXAMPLES, **_COMMON)
settings.register_profile("deep", max_examples=CI_EXAMPLES * DEEP_FACTOR, **_COMMON)
PROFILE = os.environ.get(PROFILE_ENV, "ci")
settings.load_profile(PROFILE)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print how many examples each property ran to completion."""
    if not EXAMPLES:
        return
    terminalreporter.section(f"property examples (hypothesis profile {PROFILE!r})")
    width = max(len(name) for name in EXAMPLES)
    for name, count in sorted(EXAMPLES.items()):
        terminalreporter.write_line(f"{name.ljust(width)}  {count:6d} examples")
