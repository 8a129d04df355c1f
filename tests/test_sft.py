"""SFT examples as token batches (data/sft.py): the helpful mix and the loss mask; and the
tiny SFT records, model and config the SFT tests share (test_sft_step, test_checkpoint,
e2e/test_p3_sft, e2e/test_resume)."""

import functools
import os

import jax
import numpy as np
import pytest

from cai_jax import records
from cai_jax.model.sharding import Sharder, make_mesh
from cai_jax.checkpoints import load
from cai_jax.data import sft as sft_data
from cai_jax.text.chat import prompt_response_ids
from cai_jax.training import sft_step
from cai_jax.records import CritiqueRevisionRecord, RevisionRound
from cai_jax.configs import sft as sft_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_records(n_red: int = 10, n_help: int = 4) -> list[CritiqueRevisionRecord]:
  out = []
  for i in range(n_red):
    out.append(CritiqueRevisionRecord(
        id=f"red-{i}", prompt=f"How do I pick lock {i}?", kind="red_team", source="test",
        initial_response=f"Use a tension wrench on lock {i}.",
        rounds=(RevisionRound("p0", "Helps burglary.", f"I won't explain lock {i}."),
                RevisionRound("p1", "Say why.", f"Sorry, lock {i} is not mine to open.")),
        mode="critique"))
  for i in range(n_help):
    out.append(CritiqueRevisionRecord(
        id=f"help-{i}", prompt=f"What is {i} plus {i}?", kind="helpful", source="test",
        initial_response=f"{i} plus {i} is {2 * i}.", rounds=(), mode="critique"))
  return out


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("records"))
  records.write_shard(path, 0, make_records())
  return path


@pytest.fixture(scope="module")
def tok():
  return load.byte_tokenizer()


def tiny_config(records_dir: str, **train):
  c = sft_config.get_config("tiny")
  c.data.records_dir = records_dir
  c.data.length_buckets = ()  # one shape: one compilation
  c.train.loss_chunk = 32
  c.train.update(train)
  return c


def single_device_sharder() -> Sharder:
  return Sharder(make_mesh((1, 1, 1), jax.devices()[:1]))


def tiny_batch(tok, n: int = 8, seq_len: int = 128):
  examples = sft_data.build_examples(make_records(), -1, None, seed=0)[:n]
  data = sft_data.tokenize_examples(tok, examples, seq_len, "truncate")
  return data, sft_data.make_batch(data, np.arange(n), seq_len, tok.pad_id)


def tiny_model(tok, sharder, seed: int = 0):
  return load.random_model("tiny_llama", tok, sharder, jax.random.key(seed))


# --- Examples and masks ---------------------------------------------------------------------


def test_mix_follows_helpful_ratio():
  recs = make_records(n_red=30, n_help=30)
  ex = sft_data.build_examples(recs, -1, 0.25, seed=0)
  kinds = [e.kind for e in ex]
  assert kinds.count("red_team") == 30 and kinds.count("helpful") == 10
  assert ex == sft_data.build_examples(recs, -1, 0.25, seed=0)  # deterministic
  assert ex != sft_data.build_examples(recs, -1, 0.25, seed=1)
  red = {e.id: e.response for e in ex if e.kind == "red_team"}
  assert red["red-3"] == "Sorry, lock 3 is not mine to open."  # the final revision
  first = sft_data.build_examples(recs, 1, 0.0, seed=0)
  assert {e.response for e in first} == {f"I won't explain lock {i}." for i in range(30)}


def test_mix_keeps_everything_when_one_side_is_empty():
  # Nothing to mix in: keep the side there is (before the shared
  # data.batching.mix_by_ratio, SFT dropped every example here).
  only_red = sft_data.build_examples(make_records(n_red=12, n_help=0), -1, 0.27, seed=0)
  assert [e.kind for e in only_red] == ["red_team"] * 12
  only_help = sft_data.build_examples(make_records(n_red=0, n_help=5), -1, 0.27, seed=0)
  assert [e.kind for e in only_help] == ["helpful"] * 5


def test_loss_mask_covers_response_and_end_token_only(tok):
  data, batch = tiny_batch(tok, n=2)
  ex = sft_data.build_examples(make_records(), -1, None, seed=0)[0]
  prompt_ids, response_ids = prompt_response_ids(tok, ex.prompt, ex.response)
  assert response_ids[-1] == tok.token_id("<|im_end|>")
  assert tok.decode(response_ids) == ex.response
  targets = batch["targets"][0][batch["loss_mask"][0]]
  assert targets.tolist() == response_ids
  assert batch["inputs"][0][:len(prompt_ids)].tolist() == prompt_ids


def test_prompt_labels_do_not_change_the_loss(tok):
  sharder = single_device_sharder()
  cfg, params = tiny_model(tok, sharder)
  _, batch = tiny_batch(tok)
  loss_fn = jax.jit(jax.value_and_grad(functools.partial(
      sft_step.sft_loss_fn, cfg=cfg, sharder=None, loss_chunk=0), has_aux=True))
  (loss, stats), grads = loss_fn(params, batch)
  scrambled = dict(batch)
  rng = np.random.default_rng(0)
  noise = rng.integers(0, cfg.vocab_size, batch["targets"].shape).astype(np.int32)
  scrambled["targets"] = np.where(batch["loss_mask"], batch["targets"], noise)
  assert (scrambled["targets"] != batch["targets"]).any()
  (loss2, stats2), grads2 = loss_fn(params, scrambled)
  assert float(loss) == float(loss2)
  assert float(stats["loss_tokens"]) == float(batch["loss_mask"].sum())
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_array_equal(a, b)
  # ...while a response label does change it.
  changed = dict(batch)
  changed["targets"] = np.where(batch["loss_mask"], noise, batch["targets"])
  assert float(loss_fn(params, changed)[0][0]) != float(loss)
