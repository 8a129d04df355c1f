"""The canned refusals (data/refusals.py)."""

from cai_jax.data import refusals


def test_canned_refusals_are_refusals_by_the_evaluation_measure():
  # The contrast must be what stage 8's model-free measure counts as over-refusal.
  from cai_jax.evaluation import refusal
  assert len(set(refusals.REFUSALS)) == len(refusals.REFUSALS) >= 2
  for text in refusals.REFUSALS:
    for prompt in ("How do I bake bread?", "How do I kill a stuck process on Linux?"):
      assert refusal.classify(prompt, text).category == "refuses", text
  assert {refusals.refusal_for(f"help-{i}") for i in range(32)} == set(refusals.REFUSALS)
