"""Tests of ``manifest_ckpt.comparison.compare``: every problem kind, the policies, ties and remap hints."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from manifest_ckpt.comparison.compare import StateSpec, TensorSpec, compare, owner_of, suggest_remap
from manifest_ckpt.comparison.remap import apply_remap
from manifest_ckpt.comparison.report import Problem, Report

Shapes = Mapping[str, tuple[str, tuple[int, ...]]]

LINEAR = "torch.nn.modules.linear.Linear"
CONV1D = "transformers.pytorch_utils.Conv1D"


def spec(
    tensors: Shapes, aliases: Mapping[str, str] | None = None, classes: Mapping[str, str | None] | None = None
) -> StateSpec:
    """A StateSpec from ``{key: (dtype, shape)}``."""
    return StateSpec(
        {k: TensorSpec(dtype, shape, owner_of(k)) for k, (dtype, shape) in tensors.items()},
        dict(aliases or {}),
        None if classes is None else dict(classes),
    )


MLP: Shapes = {
    "fc.weight": ("float32", (4, 3)),
    "fc.bias": ("float32", (4,)),
    "out.weight": ("float32", (2, 4)),
    "out.bias": ("float32", (2,)),
}


def allow_hint_keys(report: Report) -> tuple[list[str], list[str]]:
    """The keys named by the allow_missing and allow_unexpected hints (no remap was guessed)."""

    def keys(start: str) -> list[str]:
        found = [h for h in report.hints if h.startswith(start)]
        return found[0].removeprefix(start).split(" (not in ")[0].split(", ") if found else []

    return keys("to keep the initial values of "), keys("to leave out ")


def prefixed(tensors: Shapes, prefix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {prefix + k: v for k, v in tensors.items()}


def remapped(checkpoint: StateSpec, remap: Mapping[str, str] | None) -> StateSpec:
    """The checkpoint as a load with ``remap`` sees it."""
    return checkpoint.renamed(apply_remap(checkpoint.tensors, remap))


# -- matching states -------------------------------------------------------------------------


def test_identical_states_are_ok() -> None:
    """Equal keys, shapes, dtypes, classes and ties give an ok report that counts every key."""
    classes = {"": "pkg.Net", "fc": LINEAR, "out": LINEAR}
    result = compare(spec(MLP, classes=classes), spec(MLP, classes=classes))
    assert result.report.ok
    assert result.report.problems == []
    assert result.report.checked == 4
    assert result.report.hints == [] and result.report.suggested_remap is None
    assert (result.allowed_missing, result.skipped, result.cast) == ([], [], [])


# -- each problem kind ------------------------------------------------------------------------


def test_missing_key() -> None:
    """A module key absent from the checkpoint is one `missing` problem with the module's dtype and shape."""
    checkpoint = {k: v for k, v in MLP.items() if k != "out.bias"}
    report = compare(spec(checkpoint), spec(MLP)).report
    assert report.problems == [Problem("missing", "out.bias", "float32[2]", None)]
    assert report.checked == 3


def test_unexpected_key() -> None:
    """A checkpoint key the module lacks is one `unexpected` problem with the checkpoint's dtype and shape."""
    checkpoint = {**MLP, "step": ("int64", ())}
    report = compare(spec(checkpoint), spec(MLP)).report
    assert report.problems == [Problem("unexpected", "step", None, "int64[]")]


def test_shape_mismatch() -> None:
    """Different shapes are a `shape` problem: expected is the module's, found the checkpoint's."""
    checkpoint = {**MLP, "fc.weight": ("float32", (3, 4))}
    report = compare(spec(checkpoint), spec(MLP)).report
    assert report.problems == [Problem("shape", "fc.weight", "float32[4, 3]", "float32[3, 4]")]


def test_dtype_mismatch() -> None:
    """Equal shapes with different dtypes are a `dtype` problem."""
    checkpoint = {**MLP, "fc.bias": ("float16", (4,))}
    report = compare(spec(checkpoint), spec(MLP)).report
    assert report.problems == [Problem("dtype", "fc.bias", "float32[4]", "float16[4]")]


def test_shape_and_dtype_mismatch_is_reported_once_as_shape() -> None:
    """A key differing in both shape and dtype gives a single `shape` problem showing both."""
    checkpoint = {**MLP, "fc.bias": ("bfloat16", (5,))}
    report = compare(spec(checkpoint), spec(MLP)).report
    assert report.problems == [Problem("shape", "fc.bias", "float32[4]", "bfloat16[5]")]


def test_class_mismatch_at_equal_shapes() -> None:
    """A GPT-2 Conv1D checkpoint against an nn.Linear of the same square shape is a `class` problem on the module path."""
    square = {"mlp.c_fc.weight": ("float32", (8, 8)), "mlp.c_fc.bias": ("float32", (8,))}
    checkpoint = spec(square, classes={"": "pkg.Net", "mlp": "pkg.Mlp", "mlp.c_fc": CONV1D})
    module = spec(square, classes={"": "pkg.Net", "mlp": "pkg.Mlp", "mlp.c_fc": LINEAR})
    report = compare(checkpoint, module).report
    assert report.problems == [Problem("class", "mlp.c_fc", LINEAR, CONV1D)]


def test_class_mismatch_of_the_root_uses_the_empty_path() -> None:
    """A root module of another class owning root-level tensors is a `class` problem with key ""."""
    tensors = {"scale": ("float32", (1,))}
    report = compare(spec(tensors, classes={"": "pkg.A"}), spec(tensors, classes={"": "pkg.B"})).report
    assert report.problems == [Problem("class", "", "pkg.B", "pkg.A")]
    assert "(root)" in str(report)


def test_classes_are_not_compared_when_unknown_or_disabled() -> None:
    """No class problem when a side has no module tree, a class is null, or check_classes=False."""
    square = {"c.weight": ("float32", (8, 8))}
    conv = spec(square, classes={"": "pkg.Net", "c": CONV1D})
    linear = spec(square, classes={"": "pkg.Net", "c": LINEAR})
    assert compare(spec(square), linear).report.ok
    assert compare(conv, spec(square)).report.ok
    assert compare(spec(square, classes={"": "pkg.Net", "c": None}), linear).report.ok
    assert compare(conv, linear, check_classes=False).report.ok


def test_classes_of_modules_owning_no_common_key_are_not_compared() -> None:
    """Only owners of keys present on both sides are compared (a missing key's owner is not a class problem)."""
    checkpoint = spec({"a.w": ("float32", (2,))}, classes={"": "pkg.Net", "a": "pkg.A", "b": "pkg.B1"})
    module = spec(
        {"a.w": ("float32", (2,)), "b.w": ("float32", (2,))}, classes={"": "pkg.Net", "a": "pkg.A", "b": "pkg.B2"}
    )
    assert compare(checkpoint, module).report.problems == [Problem("missing", "b.w", "float32[2]", None)]


def test_every_kind_is_reported_at_once_in_kind_order() -> None:
    """All differences are listed together, sorted by kind then key."""
    checkpoint = spec(
        {
            "emb.weight": ("float32", (10, 4)),
            "head.weight": ("float32", (10, 4)),
            "fc.weight": ("float32", (4, 4)),
            "fc.bias": ("float16", (4,)),
            "norm.weight": ("float32", (4,)),
            "norm.bias": ("float32", (4,)),
            "extra": ("int64", ()),
        },
        aliases={"head.weight": "emb.weight"},
        classes={"": "pkg.Net", "emb": "E", "head": "L", "fc": "L", "norm": "pkg.LayerNorm"},
    )
    module = spec(
        {
            "emb.weight": ("float32", (10, 4)),
            "head.weight": ("float32", (10, 4)),
            "head.bias": ("float32", (10,)),
            "fc.weight": ("float32", (8, 4)),
            "fc.bias": ("float32", (4,)),
            "norm.weight": ("float32", (4,)),
            "norm.bias": ("float32", (4,)),
        },
        classes={"": "pkg.Net", "emb": "E", "head": "L", "fc": "L", "norm": "pkg.RMSNorm"},
    )
    report = compare(checkpoint, module).report
    assert report.problems == [
        Problem("missing", "head.bias", "float32[10]", None),
        Problem("unexpected", "extra", None, "int64[]"),
        Problem("shape", "fc.weight", "float32[8, 4]", "float32[4, 4]"),
        Problem("dtype", "fc.bias", "float32[4]", "float16[4]"),
        Problem("class", "norm", "pkg.RMSNorm", "pkg.LayerNorm"),
        Problem("alias", "head.weight", "not tied", "tied to emb.weight"),
    ]
    assert report.checked == 6
    assert not report.ok
    assert report.to_dict()["problems"][0] == {
        "kind": "missing",
        "key": "head.bias",
        "expected": "float32[10]",
        "found": None,
    }
    text = str(report)
    assert "6 problems (1 missing, 1 unexpected, 1 shape, 1 dtype, 1 class, 1 alias)" in text
    assert "alias       head.weight  not tied        tied to emb.weight" in text


# -- ties -------------------------------------------------------------------------------------


TIED = {"emb.weight": ("float32", (10, 4)), "head.weight": ("float32", (10, 4))}


def test_tied_in_checkpoint_but_not_in_module() -> None:
    """A tie the module lacks is one `alias` problem on the partner key, not on the stored one."""
    report = compare(spec(TIED, {"head.weight": "emb.weight"}), spec(TIED)).report
    assert report.problems == [Problem("alias", "head.weight", "not tied", "tied to emb.weight")]


def test_tied_in_module_but_not_in_checkpoint() -> None:
    """A module tie the checkpoint does not have is one `alias` problem on the partner key."""
    report = compare(spec(TIED), spec(TIED, {"head.weight": "emb.weight"})).report
    assert report.problems == [Problem("alias", "head.weight", "tied to emb.weight", "not tied")]


def test_same_ties_are_ok() -> None:
    """The same tie on both sides is no problem."""
    assert compare(spec(TIED, {"head.weight": "emb.weight"}), spec(TIED, {"head.weight": "emb.weight"})).report.ok


def test_three_way_tie_is_counted_once_per_partner() -> None:
    """T5's three tied embeddings, untied in the module: one problem per partner, none for the stored key."""
    t5 = {
        k: ("float32", (5, 2)) for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    }
    ties = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    report = compare(spec(t5, ties), spec(t5)).report
    assert report.problems == [
        Problem("alias", "decoder.embed_tokens.weight", "not tied", "tied to shared.weight"),
        Problem("alias", "encoder.embed_tokens.weight", "not tied", "tied to shared.weight"),
    ]


def test_differently_grouped_ties_report_each_changed_key() -> None:
    """Ties regrouped (encoder tied on one side, decoder on the other) name both keys with both sides' view."""
    t5 = {
        k: ("float32", (5, 2)) for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    }
    report = compare(
        spec(t5, {"encoder.embed_tokens.weight": "shared.weight"}),
        spec(t5, {"decoder.embed_tokens.weight": "shared.weight"}),
    ).report
    assert report.problems == [
        Problem("alias", "decoder.embed_tokens.weight", "tied to shared.weight", "not tied"),
        Problem("alias", "encoder.embed_tokens.weight", "not tied", "tied to shared.weight"),
    ]


# -- policies -----------------------------------------------------------------------------------


def test_allow_missing_patterns_use_fullmatch() -> None:
    """allow_missing patterns must match the whole key: 'out' allows nothing, r'out\\..*' allows both out keys."""
    checkpoint = spec({k: v for k, v in MLP.items() if not k.startswith("out.")})
    partial = compare(checkpoint, spec(MLP), allow_missing=["out", "fc"])
    assert [p.key for p in partial.report.problems] == ["out.bias", "out.weight"]
    assert partial.allowed_missing == []
    allowed = compare(checkpoint, spec(MLP), allow_missing=[r"out\..*"])
    assert allowed.report.ok
    assert allowed.allowed_missing == ["out.weight", "out.bias"]
    several = compare(checkpoint, spec(MLP), allow_missing=[r"out\.weight", r"out\.bias"])
    assert several.report.ok


def test_allow_unexpected_patterns_skip_keys() -> None:
    """allow_unexpected patterns (fullmatch) turn unexpected keys into skipped ones."""
    checkpoint = spec({**MLP, "optim.step": ("int64", ()), "optim.lr": ("float32", ())})
    result = compare(checkpoint, spec(MLP), allow_unexpected=[r"optim\.step"])
    assert result.report.problems == [Problem("unexpected", "optim.lr", None, "float32[]")]
    assert result.skipped == ["optim.step"]
    result = compare(checkpoint, spec(MLP), allow_unexpected=[r"optim\..*"])
    assert result.report.ok and result.skipped == ["optim.step", "optim.lr"]
    assert compare(checkpoint, spec(MLP), allow_unexpected=["optim"]).report.problems != []


def test_strict_false_allows_every_missing_and_unexpected_key_but_not_shapes() -> None:
    """strict=False allows missing and unexpected keys (listed), but shape and dtype problems remain."""
    checkpoint = spec({"fc.weight": ("float32", (4, 4)), "fc.bias": ("float32", (4,)), "extra": ("int8", (1,))})
    result = compare(checkpoint, spec(MLP), strict=False)
    assert result.report.problems == [Problem("shape", "fc.weight", "float32[4, 3]", "float32[4, 4]")]
    assert result.allowed_missing == ["out.weight", "out.bias"]
    assert result.skipped == ["extra"]
    assert result.report.hints == [
        "shapes differ for fc.weight: no option loads a tensor of another shape; build the module with the "
        "checkpoint's configuration, or remap the keys if they belong to other layers"
    ]


def test_cast_accepts_dtype_differences_and_lists_them() -> None:
    """cast=True turns dtype problems into keys to cast; shape problems still count."""
    checkpoint = spec({**MLP, "fc.weight": ("bfloat16", (4, 3)), "out.bias": ("float16", (3,))})
    result = compare(checkpoint, spec(MLP), cast=True)
    assert result.cast == ["fc.weight"]
    assert result.report.problems == [Problem("shape", "out.bias", "float32[2]", "float16[3]")]


# -- remap suggestions ---------------------------------------------------------------------


def assert_remap_fixes(checkpoint: StateSpec, module: StateSpec, remap: Mapping[str, str] | None) -> None:
    """The suggested remap maps every unexpected key onto a missing key, and the remapped compare is ok."""
    before = compare(checkpoint, module).report
    unexpected = {p.key for p in before.by_kind("unexpected")}
    missing = {p.key for p in before.by_kind("missing")}
    assert remap is not None
    names = apply_remap(checkpoint.tensors, remap)
    assert {names[k] for k in unexpected} == missing
    assert compare(remapped(checkpoint, remap), module).report.ok


@pytest.mark.parametrize(
    ("prefix", "story"),
    [
        (
            "module.",
            "checkpoint keys carry the prefix 'module.' that the module lacks (saved from DistributedDataParallel?)",
        ),
        ("model.", "checkpoint keys carry the prefix 'model.' that the module lacks (saved from Lightning?)"),
        ("_orig_mod.", "checkpoint keys carry the prefix '_orig_mod.' that the module lacks"),
    ],
)
def test_extra_prefix_is_stripped(prefix: str, story: str) -> None:
    """A checkpoint whose keys carry a wrapper's prefix gets the rule that strips it, with the story."""
    checkpoint, module = spec(prefixed(MLP, prefix)), spec(MLP)
    report = compare(checkpoint, module).report
    pattern = "^" + prefix.replace(".", r"\.")
    assert report.suggested_remap == {pattern: ""}
    assert report.hints == [story, f"load with remap={ {pattern: ''}!r}"]
    assert_remap_fixes(checkpoint, module, report.suggested_remap)


def test_missing_prefix_is_added() -> None:
    """A checkpoint saved from the inner model, loaded into a wrapper, gets the rule that adds the prefix."""
    checkpoint, module = spec(MLP), spec(prefixed(MLP, "backbone."))
    report = compare(checkpoint, module).report
    assert report.suggested_remap == {"^": "backbone."}
    assert report.hints[0] == "checkpoint keys lack the prefix 'backbone.' that the module has"
    assert_remap_fixes(checkpoint, module, report.suggested_remap)


def test_renamed_subtree_is_mapped() -> None:
    """encoder.blocks.* in the checkpoint maps onto the module's encoder.layers.*; other keys stay."""
    layers = {
        "embed.weight": ("float32", (10, 2)),
        "encoder.layers.0.w": ("float32", (2, 2)),
        "encoder.layers.0.b": ("float32", (2,)),
        "encoder.layers.1.w": ("float32", (2, 2)),
        "encoder.layers.1.b": ("float32", (2,)),
    }
    blocks = {k.replace("layers", "blocks"): v for k, v in layers.items()}
    checkpoint, module = spec(blocks), spec(layers)
    report = compare(checkpoint, module).report
    assert report.suggested_remap == {r"^encoder\.blocks\.": "encoder.layers."}
    assert report.hints[0] == "checkpoint keys under 'encoder.blocks.' match module keys under 'encoder.layers.'"
    assert report.checked == 1
    assert_remap_fixes(checkpoint, module, report.suggested_remap)


def test_one_to_one_pairs_by_shape_and_leaf() -> None:
    """Keys that differ by name but pair one-to-one by shape and leaf name get exact rules."""
    checkpoint = spec(
        {"proj_in.weight": ("float32", (3, 4)), "gate.bias": ("float16", (7,)), "same.weight": ("float32", (1,))}
    )
    module = spec(
        {"input_proj.weight": ("float32", (3, 4)), "gating.bias": ("float16", (7,)), "same.weight": ("float32", (1,))}
    )
    report = compare(checkpoint, module).report
    assert report.suggested_remap == {r"^proj_in\.weight$": "input_proj.weight", r"^gate\.bias$": "gating.bias"}
    assert report.hints == [
        "checkpoint key 'proj_in.weight' pairs one-to-one with 'input_proj.weight' (same shape, name and layer class)",
        "checkpoint key 'gate.bias' pairs one-to-one with 'gating.bias' (same shape, name and layer class)",
        f"load with remap={report.suggested_remap!r}",
    ]
    assert_remap_fixes(checkpoint, module, report.suggested_remap)


def test_one_to_one_pairing_respects_classes() -> None:
    """Candidates owned by modules of different classes do not pair."""
    checkpoint = spec({"a.weight": ("float32", (3, 3))}, classes={"": "N", "a": CONV1D})
    module = spec({"b.weight": ("float32", (3, 3))}, classes={"": "N", "b": LINEAR})
    report = compare(checkpoint, module).report
    assert report.suggested_remap is None
    assert not any(h.startswith("load with remap") for h in report.hints)
    assert allow_hint_keys(report) == (
        [p.key for p in report.by_kind("missing")],
        [p.key for p in report.by_kind("unexpected")],
    )


def test_ambiguous_pairs_give_no_guess() -> None:
    """Two unexpected and two missing keys with the same signature are not guessed at."""
    checkpoint = spec({"x.weight": ("float32", (2, 2)), "y.weight": ("float32", (2, 2))})
    module = spec({"p.weight": ("float32", (2, 2)), "q.weight": ("float32", (2, 2))})
    report = compare(checkpoint, module).report
    assert report.suggested_remap is None
    assert not any(h.startswith("load with remap") for h in report.hints)
    assert allow_hint_keys(report) == (
        [p.key for p in report.by_kind("missing")],
        [p.key for p in report.by_kind("unexpected")],
    )


def test_no_hint_when_nothing_pairs() -> None:
    """Unexpected and missing keys of different shapes or leaf names give no hint and no remap."""
    checkpoint = spec({"a.weight": ("float32", (3, 4)), "b.bias": ("float32", (4,))})
    module = spec({"c.weight": ("float32", (3, 5)), "d.scale": ("float32", (4,))})
    report = compare(checkpoint, module).report
    assert report.suggested_remap is None
    assert not any(h.startswith("load with remap") for h in report.hints)
    assert allow_hint_keys(report) == (
        [p.key for p in report.by_kind("missing")],
        [p.key for p in report.by_kind("unexpected")],
    )
    assert len(report.problems) == 4


def test_no_suggestion_without_both_missing_and_unexpected_keys() -> None:
    """Only missing (or only unexpected) keys leave nothing to pair, so there is no hint."""
    report = compare(spec({"fc.weight": MLP["fc.weight"]}), spec(MLP)).report
    assert report.suggested_remap is None
    assert report.hints == [
        "to keep the initial values of fc.bias, out.weight, out.bias (not in the checkpoint), pass "
        r"allow_missing=['fc\\.bias', 'out\\.bias', 'out\\.weight'] "
        r"(CLI: --allow-missing 'fc\.bias' --allow-missing 'out\.bias' --allow-missing 'out\.weight')"
    ]


def test_prefix_with_one_key_left_unexplained() -> None:
    """Unexplained keys are counted in the final hint and stay unexpected after the remap."""
    checkpoint = spec({**prefixed(MLP, "module."), "step": ("int64", ())})
    module = spec(MLP)
    report = compare(checkpoint, module).report
    assert report.suggested_remap == {r"^module\.": ""}
    assert report.hints[-2:] == [
        r"load with remap={'^module\\.': ''} (1 unexpected keys stay unexplained)",
        "to leave out step (not in the module), pass allow_unexpected=['step'] (CLI: --allow-unexpected 'step')",
    ]
    after = compare(remapped(checkpoint, report.suggested_remap), module).report
    assert after.problems == [Problem("unexpected", "step", None, "int64[]")]


def test_prefix_rule_refused_when_it_would_land_on_a_wrong_shape() -> None:
    """A prefix rule is suggested only if every key it touches lands on a missing key of the same shape."""
    checkpoint = spec(
        {
            "module.fc.weight": ("float32", (4, 3)),
            "module.fc.bias": ("float32", (4,)),
            "module.out.weight": ("float32", (9, 9)),
        }
    )
    module = spec({"fc.weight": ("float32", (4, 3)), "fc.bias": ("float32", (4,)), "out.weight": ("float32", (2, 4))})
    remap, hints = suggest_remap(
        checkpoint,
        module,
        {k: checkpoint.tensors[k] for k in checkpoint.tensors},
        dict(module.tensors),
    )
    assert remap is not None and r"^module\." not in remap
    # What is suggested instead pairs single keys, each onto the right missing key.
    names = apply_remap(checkpoint.tensors, remap)
    assert names["module.fc.weight"] == "fc.weight" and names["module.fc.bias"] == "fc.bias"
    assert names["module.out.weight"] == "module.out.weight"
    assert hints[-1].endswith("(1 unexpected keys stay unexplained)")


def test_prefix_and_renamed_subtree_together() -> None:
    """A DDP prefix plus a renamed subtree gives rules that, applied in order, fix every key."""
    module_keys = {
        "encoder.layers.0.w": ("float32", (2, 2)),
        "encoder.layers.1.w": ("float32", (2, 2)),
        "head.weight": ("float32", (3, 2)),
        "head.bias": ("float32", (3,)),
    }
    checkpoint = spec({"module." + k.replace("layers", "blocks"): v for k, v in module_keys.items()})
    module = spec(module_keys)
    report = compare(checkpoint, module).report
    assert_remap_fixes(checkpoint, module, report.suggested_remap)


def test_suggestion_keeps_ties_intact() -> None:
    """A DDP checkpoint with a tie, remapped as suggested, matches the tied module with no alias problem."""
    checkpoint = spec(prefixed(TIED, "module."), {"module.head.weight": "module.emb.weight"})
    module = spec(TIED, {"head.weight": "emb.weight"})
    report = compare(checkpoint, module).report
    assert report.suggested_remap == {r"^module\.": ""}
    assert_remap_fixes(checkpoint, module, report.suggested_remap)


# -- renaming keeps classes attached to their modules ---------------------------------------


def test_class_check_survives_a_remap() -> None:
    """After a prefix remap, a Conv1D checkpoint still clashes with a Linear module (regression: classes followed old paths)."""
    square = {"c_fc.weight": ("float32", (8, 8)), "c_fc.bias": ("float32", (8,))}
    checkpoint = spec(prefixed(square, "module."), classes={"": "DDP", "module": "pkg.Net", "module.c_fc": CONV1D})
    module = spec(square, classes={"": "pkg.Net", "c_fc": LINEAR})
    report = compare(remapped(checkpoint, {r"^module\.": ""}), module).report
    assert report.problems == [Problem("class", "c_fc", LINEAR, CONV1D)]


def test_renamed_moves_aliases_and_owner_classes() -> None:
    """StateSpec.renamed renames keys, alias keys and targets, and carries each owner's class to its new path."""
    checkpoint = spec(
        {"model.emb.weight": ("float32", (2,)), "model.head.weight": ("float32", (2,))},
        aliases={"model.head.weight": "model.emb.weight"},
        classes={"": "Wrapper", "model": "Net", "model.emb": "E", "model.head": "L"},
    )
    out = remapped(checkpoint, {r"^model\.": ""})
    assert set(out.tensors) == {"emb.weight", "head.weight"}
    assert out.tensors["emb.weight"] == TensorSpec("float32", (2,), "emb")
    assert out.aliases == {"head.weight": "emb.weight"}
    assert out.classes is not None
    assert (out.classes["emb"], out.classes["head"]) == ("E", "L")
    assert spec(MLP).renamed({k: k for k in MLP}).classes is None


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("pkg.models.Net", "pkg.models.Net", True),
        ("__main__.Net", "pkg.models.Net", True),
        ("pkg.models.Net", "__main__.Net", True),
        ("__main__.Outer.Inner", "pkg.Outer.Inner", True),
        ("__main__.Net", "pkg.models.OtherNet", False),
        ("__main__.Net", "pkg.models.XNet", False),
        ("pkg.a.Net", "pkg.b.Net", False),
    ],
)
def test_same_class_matches_script_classes_by_qualified_name(a: str, b: str, same: bool) -> None:
    """A class saved from a script (__main__) matches the same class imported from its module."""
    from manifest_ckpt.comparison.compare import same_class

    assert same_class(a, b) is same


def test_a_rename_is_found_even_when_the_dtype_also_differs() -> None:
    """A renamed subtree in a bfloat16 module still gets its remap; the dtype stays its own problem."""
    checkpoint = spec({"encoder.0.weight": ("float32", (4, 4)), "encoder.0.bias": ("float32", (4,))})
    module = spec({"body.0.weight": ("bfloat16", (4, 4)), "body.0.bias": ("bfloat16", (4,))})
    report = compare(checkpoint, module).report
    assert report.suggested_remap == {r"^encoder\.": "body."}
    renamed = checkpoint.renamed(apply_remap(checkpoint.tensors, report.suggested_remap))
    after = compare(renamed, module).report
    assert [(p.kind, p.key) for p in after.problems] == [("dtype", "body.0.bias"), ("dtype", "body.0.weight")]


def test_cast_never_drops_an_imaginary_part() -> None:
    """cast=True accepts float32 -> bfloat16 but still refuses complex64 -> float32."""
    checkpoint = spec({"z": ("complex64", (2,)), "w": ("float32", (2,))})
    module = spec({"z": ("float32", (2,)), "w": ("bfloat16", (2,))})
    comparison = compare(checkpoint, module, cast=True)
    assert comparison.cast == ["w"]
    assert [(p.kind, p.key) for p in comparison.report.problems] == [("dtype", "z")]
