"""Module selection patterns (sparamx.select): one language for pruning (prune.include /
prune.skip), packing (pack.include / pack.exclude) and swap_linears."""

import pytest
import torch
from torch import nn

import pruning
from sparamx import select
from sparamx.layers import SparseLinear, linear_names, swap_linears
from sparamx.pipeline.config import ConfigError, load_config

NAME = "model.layers.3.mlp.down_proj"


@pytest.mark.parametrize(
    "pattern, hit",
    [
        (NAME, True),  # exact
        ("mlp.down_proj", True),  # dotted suffix
        ("down_proj", True),
        ("own_proj", False),  # a suffix must start at a dot
        ("*.mlp.*", True),  # glob
        ("model.layers.1?.*", False),
        ("model.layers.[0-3].mlp.*", True),
        ("re:.*\\.(gate|up|down)_proj", True),  # regex, whole name
        ("re:mlp", False),  # a regex must match the whole name, not a part
        ("re:model\\.layers\\.(1|2)\\..*", False),
        ("MLP.down_proj", False),  # case-sensitive
    ],
)
def test_pattern_forms(pattern, hit):
    assert select.matches(NAME, pattern) is hit


def test_selection_is_include_minus_exclude():
    assert select.is_selected(NAME, None, None)
    assert select.is_selected(NAME, ["*.mlp.*"], ["lm_head"])
    assert not select.is_selected(NAME, ["*.mlp.*"], ["re:.*\\.3\\..*"])
    assert not select.is_selected(NAME, ["*.self_attn.*"], None)
    assert select.unmatched(["*.mlp.*", "nothing_here"], [NAME]) == ["nothing_here"]


def test_bad_patterns_are_named():
    with pytest.raises(select.PatternError, match=r"prune.include\[1\]: module pattern 're:\('"):
        select.check_patterns(["*", "re:("], "prune.include")
    with pytest.raises(select.PatternError, match=r"pack.exclude\[0\]: expected a non-empty"):
        select.check_patterns([""], "pack.exclude")


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.include=[re:(]", r"prune.include\[0\]: module pattern 're:\(': invalid regular"),
        ("prune.skip=[lm_head, 're:[a-']", r"prune.skip\[1\]"),
        ("pack.exclude=['re:*']", r"pack.exclude\[0\]"),
        ("prune.include=[]", r"prune.include.*at least one pattern"),
    ],
)
def test_config_validates_patterns(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_pruning_only_the_selected_linears(tiny_llama):
    before = {
        n: m.weight.detach().clone()
        for n, m in tiny_llama.named_modules()
        if isinstance(m, nn.Linear)
    }
    res = pruning.prune(tiny_llama, "magnitude", 0.5, include=["*.mlp.*"], progress=False)
    pruned = {s["name"] for s in res.stats}
    assert pruned == {n for n in before if ".mlp." in n}
    for name, w in before.items():
        now = tiny_llama.get_submodule(name).weight
        if name in pruned:
            assert (now == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        else:
            assert torch.equal(now, w)  # attention and lm_head untouched


def test_regex_include_and_glob_skip_combine(tiny_llama):
    res = pruning.prune(
        tiny_llama,
        "magnitude",
        0.5,
        include=["re:.*\\.(q|k)_proj"],
        skip=["lm_head", "model.layers.1.*"],
        progress=False,
    )
    assert [s["name"] for s in res.stats] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]


def test_pruning_and_swapping_select_the_same_modules(tiny_llama):
    include, exclude = ["re:.*\\.mlp\\..*", "o_proj"], ["lm_head", "model.layers.0.mlp.up_proj"]
    res = pruning.prune(tiny_llama, "magnitude", 0.5, include=include, skip=exclude, progress=False)
    pruned = [s["name"] for s in res.stats]
    assert pruned == linear_names(tiny_llama, include, exclude)
    swapped = swap_linears(tiny_llama, include=include, exclude=exclude)
    assert swapped == pruned
    kinds = {n: type(tiny_llama.get_submodule(n)) for n in _linears(tiny_llama) + swapped}
    assert {n for n, k in kinds.items() if k is SparseLinear} == set(pruned)
    # The packed layers compute what the pruned linears did.
    x = torch.randint(0, 257, (1, 7))
    with torch.no_grad():
        assert torch.isfinite(tiny_llama(x).logits).all()


def test_swap_linears_rejects_a_bad_regex(tiny_llama):
    with pytest.raises(select.PatternError, match="include"):
        swap_linears(tiny_llama, include=["re:)"])


def test_sweep_artifacts_are_keyed_by_patterns(tmp_path):
    from sparamx.sweep import grid as sweep_grid
    from sparamx.sweep import runner as sw

    sweep = sweep_grid.SweepConfig()
    exp = sweep_grid.expand_grid(sweep)[0]
    a = sw.Sweep(tmp_path, sweep, load_config(None)).artifact_dir(exp)
    b = sw.Sweep(tmp_path, sweep, load_config(None, ["prune.include=['*.mlp.*']"])).artifact_dir(
        exp
    )
    c = sw.Sweep(tmp_path, sweep, load_config(None, ["pack.exclude=[lm_head]"])).artifact_dir(exp)
    assert len({a, b, c}) == 3
    # Run-time settings do not change the artifact.
    other = sweep_grid.Experiment(**{**exp.__dict__, "threads": 7, "kernel": "portable", "id": "x"})
    assert sw.Sweep(tmp_path, sweep, load_config(None)).artifact_dir(other) == a
