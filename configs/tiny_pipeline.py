"""The whole pipeline in minutes on a CPU, for tests and fault drills: configs/
pipeline.py's tiny+grpo+dpo with the generation and feedback stages on one tiny model
directory (e.g. a random Llama with a real BPE tokenizer, as tests/conftest.py makes),
SFT and the PM on random byte-tokenizer models, every later stage reading the workdir.

  cai-jax pipeline --config=tiny_pipeline:<tiny model HF dir> --workdir=/tmp/tiny
"""

from cai_jax.configs import pipeline


def get_config(model: str = ""):
  if not model:
    raise ValueError("configs/tiny_pipeline.py: name the model directory after the colon,"
                     " --config=tiny_pipeline:<tiny model HF dir>")
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
