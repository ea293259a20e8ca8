"""The shared plug-in registry: names checked at registration, one error shape for unknown names."""

from __future__ import annotations

import pytest

from ftguard.errors import FtguardError
from ftguard.registry import Registry


class Widget:
    pass


class OtherWidget:
    pass


def test_register_rejects_bad_names_and_a_second_entry_under_one_name():
    widgets = Registry("widget")
    for bad in ("", "Widget", "two words"):
        with pytest.raises(ValueError, match="non-empty lower-case word"):
            widgets.register(bad, Widget)
    widgets.register("gear", Widget)
    widgets.register("gear", Widget)  # a module imported twice registers the same class again
    with pytest.raises(
        ValueError, match=r"widget 'gear' is registered twice \(test_registry, test_registry\)"
    ):
        widgets.register("gear", OtherWidget)
    assert widgets == {"gear": Widget}


def test_require_names_the_close_entries_and_lists_the_rest():
    widgets = Registry("widget")
    for name in ("gear", "gears", "spring"):
        widgets.register(name, Widget)
    assert widgets.require("spring") is Widget
    with pytest.raises(FtguardError) as exc:
        widgets.require("geer")
    assert str(exc.value) == (
        "unknown widget 'geer'; did you mean 'gear' or 'gears'? (available: gear, gears, spring)"
    )
    assert widgets.unknown("lever", " for stage 'x'", choices=["spring"]) == (
        "unknown widget 'lever' for stage 'x' (available: spring)"
    )


def test_lookups_import_the_builtins_first():
    widgets: Registry[type] = Registry("widget", load_builtins=lambda: widgets.register("gear", Widget))
    assert "gear" not in widgets
    assert widgets.loaded() == {"gear": Widget}
    assert widgets.require("gear") is Widget


def test_every_plugin_kind_shares_the_shape():
    from ftguard.attacks.base import get_attack
    from ftguard.evaluation.judges import get_judge
    from ftguard.evaluation.winrate import get_pairwise_judge
    from ftguard.methods.registry import get_method

    for lookup, kind in (
        (lambda: get_method("vacine", "align"), "method 'vacine' for stage 'align'; did you mean 'vaccine'"),
        (lambda: get_attack("virsu"), "attack 'virsu'; did you mean 'virus'"),
        (lambda: get_judge("minlm"), "judge 'minlm'; did you mean 'minilm'"),
        (lambda: get_pairwise_judge("local_lm"), "pairwise judge 'local_lm'; did you mean 'local-lm'"),
    ):
        with pytest.raises(FtguardError, match=f"^unknown {kind}"):
            lookup()
