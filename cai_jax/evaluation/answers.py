"""Each model's answers to the evaluation prompts, and which model specs exist."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence

import ml_collections

from cai_jax import assets
from cai_jax.model.sharding import Sharder
from cai_jax.sampling.chat import ChatModel
from cai_jax.text.chat import user_turn


# Stage 8's over-refusal sets (safe prompts that sound dangerous, evaluation only): the
# split their answers carry -> what the report calls them.
OVER_REFUSAL_SETS = {"borderline": "safe-but-dangerous-sounding",
                     "external": "external safe-but-edgy"}


@dataclasses.dataclass(frozen=True)
class AnswerRecord:
  """One model's answer to one prompt. split: "held_out", "sample" (stage-2 prompt) or an
  over-refusal set's name (`OVER_REFUSAL_SETS`)."""

  id: str
  prompt: str
  kind: str
  split: str
  model: str
  response: str


def spec_exists(spec: str) -> bool:
  """A directory / file that exists, a bundled asset that is installed, or a hub id."""
  if not spec:
    return False
  if os.path.sep in spec or spec.startswith("."):
    return os.path.exists(spec)
  if spec in assets.ASSETS:
    return assets.is_available(spec)
  return True  # "random:<preset>" or a hub id: load_model decides


def fingerprint(spec: str) -> str:
  """Changes when a model directory is rewritten, so stale answers are refused."""
  if not os.path.isdir(spec):
    return spec
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(spec)):
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      h.update(f"{os.path.relpath(os.path.join(root, name), spec)}:{st.st_size}:"
               f"{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


class Answerer:
  """One model answering chunks of (id, prompt, kind, split) rows.

  Each sequence's key is named by the prompt, not the model, so the models
  are compared under common random numbers.
  """

  def __init__(self, config: ml_collections.ConfigDict, name: str, spec: str,
               sharder: Sharder):
    self.name = name
    self.model = ChatModel(spec, sharder, config)

  def __call__(self, chunk: Sequence[tuple[str, str, str, str]]) -> list[AnswerRecord]:
    texts = self.model.generate([user_turn(p) for _, p, _, _ in chunk],
                                [f"{i}/answer" for i, *_ in chunk])
    return [AnswerRecord(i, p, k, s, self.name, t) for (i, p, k, s), t in zip(chunk, texts)]


def answer_config(config: ml_collections.ConfigDict, spec: str) -> ml_collections.ConfigDict:
  """What an answers directory depends on (refuses to resume under anything else)."""
  return ml_collections.ConfigDict({
      "spec": spec, "fingerprint": fingerprint(spec), "seed": config.seed,
      "dtype": config.dtype, "max_new_tokens": config.max_new_tokens,
      "max_prompt_tokens": config.max_prompt_tokens, "sampling": dict(config.sampling)})
