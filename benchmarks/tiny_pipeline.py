"""The tiny pipeline of tests/test_pipeline.py and benchmarks/chaos.py: configs/
pipeline.py's tiny+grpo+dpo with the generation and feedback stages on one tiny model
directory (a random Llama with a real BPE tokenizer, tests/conftest.py), SFT and the
PM on random byte-tokenizer models, every later stage reading the workdir.

  --config=benchmarks/tiny_pipeline.py:<tiny model HF dir>
"""

from configs import pipeline


def get_config(model: str):
  c = pipeline.get_config("tiny+grpo+dpo")
  c.critique_revision.model = model
  c.critique_revision.num_few_shot = 0
  c.ai_labels.feedback_models = (model,)
  for rl in (c.ppo, c.grpo):
    rl.model = ""  # <workdir>/p3_sft/hf
    rl.reward_model = ""  # <workdir>/p6_preference_model
    rl.learner.iterations = 2
    rl.data.max_prompt_len = 256
  c.ppo.rollout.batch_size = 8
  c.grpo.rollout.batch_size = 2  # x 4 samples a prompt: PPO's 8 sequences
  c.dpo.model = ""
  c.dpo.train.num_steps = 4
  c.evaluation.models.initial = model
  c.evaluation.judge.model = model
  c.evaluation.accuracy.models = (model,)
  return c
