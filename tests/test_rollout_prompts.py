"""Stage 7's prompts (data/rollout_prompts.py): the prompt width."""


def test_prompt_width_is_the_longest_prompt_rounded_up():
  from cai_jax.data.rollout_prompts import PromptSet
  ps = PromptSet(["a", "b"], [[1] * 20, [1] * 33])
  assert ps.width(128) == 48  # 33 rounded up to 16
  assert ps.width(40) == 40  # never above the allowed maximum
  assert PromptSet(["a"], [[1] * 32]).width(128) == 32
