"""What recommend knows about issue 21's methods: their facts come from the strategies' declarations,
and the rules place them (privacy, compute) and say what they need."""

from __future__ import annotations

from retain.guide.catalogue import (
    CATALOGUE,
    extra_passes,
    find_hybrid,
    holds_frozen_copy,
    stores_real_data,
    uses_adapters,
)
from retain.guide.rules import Constraints, assess


def test_new_hybrids_are_in_the_catalogue_with_their_facts():
    keys = {h.key for h in CATALOGUE}
    for key in ("full+replay+wise", "lora+wise", "lora@lora.init=milora", "lora@lora.init=corda", "lora@lora.init=pissa",
                "osf", "block-expansion", "full+dft", "full+replay+lwf@replay.mode=append@lwf.anchor=replay"):
        assert key in keys, key
    assert holds_frozen_copy(find_hybrid("full+replay+wise"))  # the base weights, for the interpolation
    assert not holds_frozen_copy(find_hybrid("lora+wise"))  # adapters scale in place
    assert stores_real_data(find_hybrid("full+replay+wise")) and not stores_real_data(find_hybrid("full+dft"))
    assert uses_adapters(find_hybrid("lora@lora.init=corda")) and not uses_adapters(find_hybrid("block-expansion"))
    assert extra_passes(find_hybrid("full+dft")) == 0


def test_privacy_and_compute_place_them():
    strict, low = Constraints(privacy="strict"), Constraints(compute="low")
    assert assess(find_hybrid("full+replay+wise"), strict).excluded
    assert assess(find_hybrid("full+replay+lwf@replay.mode=append@lwf.anchor=replay"), strict).excluded
    assert not assess(find_hybrid("full+dft"), strict).excluded
    assert any("osf" in why for why in assess(find_hybrid("osf"), low).excluded_by)
    assert not assess(find_hybrid("lora@lora.init=milora"), low).excluded
    assert not assess(find_hybrid("lora+wise"), low).excluded


def test_notes_say_what_a_method_needs():
    high = Constraints(compute="high")
    wise = assess(find_hybrid("full+replay+wise"), high)
    assert any("select part" in why and "eval.suite" in why for why in wise.reasons)
    assert not any("mofo" in why for why in wise.reasons)  # no unmeasured add-on advice: full+mofo competes itself
    corda = assess(find_hybrid("lora@lora.init=corda"), high)
    assert any("general_data" in why for why in corda.reasons)
    assert not any("mofo" in why for why in corda.reasons)
    assert find_hybrid("full+mofo").names == ("full", "mofo")
