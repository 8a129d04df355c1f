"""The tiny pipeline of tests/test_pipeline.py and benchmarks/chaos.py: configs/
pipeline.py's tiny+dpo with the generation and feedback stages on one tiny model
directory (a random Llama with a real BPE tokenizer, tests/conftest.py), SFT and the
PM on random byte-tokenizer models, every later stage reading the workdir.

  --config=benchmarks/tiny_pipeline.py:<tiny model HF dir>
"""

from configs import pipeline


def get_config(model: str):
  c = pipeline.get_config("tiny+dpo")
  c.critique_revision.model = model
  c.critique_revision.num_few_shot = 0
  c.ai_labels.feedback_models = (model,)
  c.ppo.model = ""  # <workdir>/p3_sft/hf
  c.ppo.reward_model = ""  # <workdir>/p6_preference_model
  c.ppo.learner.iterations = 2
  c.ppo.data.max_prompt_len = 256
  c.ppo.rollout.batch_size = 8
  c.dpo.model = ""
  c.dpo.train.num_steps = 4
  c.evaluation.models.initial = model
  c.evaluation.judge.model = model
  c.evaluation.accuracy.models = (model,)
  return c
