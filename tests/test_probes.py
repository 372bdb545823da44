"""Probe texts: which elements a prompt is asked about, controls included."""

from raymem.probes import control_elements, probes_for


def test_control_elements_are_other_entities_implied_elements_chosen_stably():
    vocabulary = {"minarets", "a river", "seagulls", "domes", "a lighthouse"}
    picked = control_elements("qadira-1", {"minarets", "domes"}, vocabulary, 2)
    assert len(picked) == 2 and not set(picked) & {"minarets", "domes"} and set(picked) <= vocabulary
    assert control_elements("qadira-1", {"minarets", "domes"}, vocabulary, 2) == picked  # stable across runs
    # spread over the vocabulary: other prompts get other picks
    picks = {control_elements(f"p{i}", set(), vocabulary, 1) for i in range(40)}
    assert len(picks) == len(vocabulary)
    assert control_elements("p", set(vocabulary), vocabulary, 3) == ()  # nothing left to ask about
    assert control_elements("p", set(), vocabulary, 0) == ()


def test_controls_are_probed_on_the_class_noun_after_the_prompts_own_elements():
    probes = probes_for("a photo of X", "X", "a city", ("a flag",), ("minarets",), (), (), ("a flag", "seagulls"))
    controls = [p for p in probes if p.kind == "control"]
    # an element the prompt asks about itself is not a control
    assert [(p.element, p.text) for p in controls] == [("seagulls", "a photo of a city with seagulls")]
