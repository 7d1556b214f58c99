"""``manifest-ckpt demo``: the whole story on a built-in model, offline, in a few seconds."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, TextIO

import torch

from manifest_ckpt.cli.render import inspect_text
from manifest_ckpt.demo_models import TinyGPT, tiny_gpt, tiny_gpt_variant
from manifest_ckpt.errors import ModelMismatchError
from manifest_ckpt.reader import check, load, verify
from manifest_ckpt.storage.store import open_store, read_store_manifest
from manifest_ckpt.writer import save


def _step(out: TextIO, title: str) -> None:
    out.write(f"\n== {title} ==\n")


def run_demo(workdir: Path, out: TextIO, *, as_json: bool = False) -> int:
    """Run every step; return 0 when each behaved as the library promises, else 1.

    ``as_json`` writes one JSON document (each step's outcome) instead of the narrative.
    """
    narrative = io.StringIO() if as_json else out
    steps: list[dict[str, Any]] = []
    failures = _run(workdir, narrative, steps)
    if as_json:
        document = {"ok": not failures, "failures": failures, "steps": steps}
        out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return 0 if not failures else 1


def _run(workdir: Path, out: TextIO, steps: list[dict[str, Any]]) -> int:
    failures = 0
    model = tiny_gpt()
    ckpt = workdir / "tiny-gpt"

    _step(out, "1. save a model (tied embeddings, layer norms, attention)")
    out.write(f">>> mc.save(model, {str(ckpt)!r}, lineage={{'run': 'demo'}})\n")
    manifest = save(model, ckpt, lineage={"run": "demo"}, overwrite=ckpt.exists())
    out.write(f"digest {manifest.digest}\n")
    steps.append({"step": "save", "ok": True, "digest": manifest.digest, "tensors": len(manifest.tensors)})

    _step(out, "2. inspect")
    store = open_store(ckpt)
    out.write(inspect_text(read_store_manifest(store), store.location, max_depth=2) + "\n")
    steps.append({"step": "inspect", "ok": True})

    _step(out, "3. verify: schema, file binding, every tensor digest")
    verify(ckpt)
    out.write(f"OK: {len(manifest.tensors)} tensors verified\n")
    steps.append({"step": "verify", "ok": True, "tensors_verified": len(manifest.tensors)})

    _step(out, "4. a look-alike model is refused, every difference listed at once")
    report = check(tiny_gpt_variant(), ckpt)
    out.write(str(report) + "\n")
    if report.ok:
        failures += 1
        out.write("UNEXPECTED: the wrong model passed the check\n")
    steps.append({"step": "refuse_wrong_model", "ok": not report.ok, "problems": len(report.problems)})

    _step(out, "5. a checkpoint saved from DistributedDataParallel (keys prefixed 'module.')")
    prefixed = workdir / "tiny-gpt-ddp"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    save(state, prefixed, overwrite=prefixed.exists())
    torch.manual_seed(2)
    target = TinyGPT()  # same architecture, other random values
    before = {k: v.clone() for k, v in target.state_dict().items()}
    try:
        load(target, prefixed)
        failures += 1
        out.write("UNEXPECTED: the prefixed checkpoint loaded without a remap\n")
        remap = None
    except ModelMismatchError as exc:
        missing, unexpected = len(exc.report.by_kind("missing")), len(exc.report.by_kind("unexpected"))
        out.write(f"refused: {missing} missing, {unexpected} unexpected keys\n")
        for hint in exc.report.hints:
            out.write(f"hint: {hint}\n")
        remap = exc.report.suggested_remap
    untouched = all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    out.write(f"module left untouched by the refused load: {untouched}\n")
    failures += 0 if untouched else 1
    steps.append({"step": "refuse_prefixed_keys", "ok": remap is not None and untouched, "suggested_remap": remap})

    _step(out, "6. load through the suggested remap")
    out.write(f">>> mc.load(model, {str(prefixed)!r}, remap={remap!r})\n")
    result = load(target, prefixed, remap=remap)
    same = all(torch.equal(model.state_dict()[k], v) for k, v in target.state_dict().items())
    tied = target.lm_head.weight is target.wte.weight
    out.write(f"loaded {len(result.loaded)} keys; bit-exact: {same}; lm_head still tied to wte: {tied}\n")
    failures += 0 if same and tied else 1
    steps.append({"step": "load_with_remap", "ok": same and tied, "loaded": len(result.loaded), "bit_exact": same})
    out.write("\ndemo " + ("finished: every step behaved as promised\n" if not failures else f"FAILED {failures} steps\n"))
    return failures
