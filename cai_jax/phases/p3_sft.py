"""Stage 3 (SL-CAI SFT): fine-tune on (prompt, final revision) + helpful answers.

Reads stage 2's `CritiqueRevisionRecord`s. Red-team records give
(prompt, response after `revision_round` revisions); helpful records give
(prompt, initial answer), mixed in at `helpful_ratio` so the model stays
helpful. Each pair is one chat (user prompt, assistant response, end-of-turn
token); the loss is the token cross entropy on the response and its
end-of-turn token only (`losses.sft_loss`).

Batches are padded to a small set of length buckets (default: one,
`seq_len`) rather than packed: packing needs segment-aware attention, which
`transformer.hidden_states` does not have, and with buckets every shape
compiles once. The data order is a function of (seed, epoch), so the data
position is just the step and a resumed run reproduces the uninterrupted run
bit for bit.

Output, under `<workdir>/p3_sft/`: `checkpoints/` (Orbax: params, optimizer
state, PRNG key, data position), `metrics.jsonl`, `tensorboard/` and the
final model as a Hugging Face directory `hf/`.

  python -m cai_jax.phases.p3_sft --config=configs/sft.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cai_jax import distributed, records
from cai_jax.checkpoints import hf
from cai_jax.checkpoints.load import load_model
from cai_jax.model import transformer
from cai_jax.model.config import ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.phases import cli, common, p2_critique_revision
from cai_jax.tokenizer import Tokenizer
from cai_jax.training import checkpoint, losses, optim
from cai_jax.training import data as training_data
from cai_jax.training import loop as train_loop

OUT = "p3_sft"


def output_dir(workdir: str) -> str:
  return os.path.join(workdir, OUT)


# --- Model ------------------------------------------------------------------------------


def load_sft_model(config: ml_collections.ConfigDict, sharder: Sharder, key: jax.Array
                   ) -> tuple[ModelConfig, transformer.Params, Tokenizer]:
  """(cfg, params in their shardings, tokenizer) for `config.model`."""
  overrides = dict(config.model_overrides)
  cfg, params, tok = load_model(config.model, sharder, tokenizer=config.tokenizer,
                                key=key, **overrides)
  logging.info("model %s: %s, %.1fM params; %r", config.model, cfg.family,
               cfg.num_params() / 1e6, tok)
  return cfg, params, tok


# --- Examples: records -> (prompt, response) -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  kind: str  # "red_team" | "helpful"
  prompt: str
  response: str


def build_examples(recs: Sequence[records.CritiqueRevisionRecord], revision_round: int,
                   helpful_ratio: float | None, seed: int) -> list[Example]:
  """Red-team (prompt, revision `revision_round`) + helpful (prompt, initial answer).

  `helpful_ratio` is the fraction of helpful examples in the mix (None: use
  every record). The larger side is subsampled, with `seed`, to hit it.
  """
  red, helpful, skipped = [], [], collections.Counter()
  for r in recs:
    if r.kind == "red_team":
      if revision_round > len(r.rounds) or (revision_round == -1 and not r.rounds):
        skipped["red_team record without the requested revision round"] += 1
        continue
      response = r.response_at(revision_round)
      bucket = red
    elif r.kind == "helpful":
      response = r.initial_response
      bucket = helpful
    else:
      raise ValueError(f"record {r.id}: kind {r.kind!r}, expected 'red_team' or 'helpful'")
    if not response.strip() or not r.prompt.strip():
      skipped["empty prompt or response"] += 1
      continue
    bucket.append(Example(r.id, r.kind, r.prompt, response))
  for why, n in skipped.items():
    logging.warning("skipped %d records: %s", n, why)

  red, helpful = training_data.mix_by_ratio(red, helpful, helpful_ratio,
                                            np.random.default_rng(seed),
                                            ("red-team", "helpful"))
  logging.info("SFT mix: %d red-team revisions + %d helpful answers", len(red), len(helpful))
  return red + helpful


def split_eval(examples: Sequence[Example], eval_size: int, seed: int
               ) -> tuple[list[Example], list[Example]]:
  """(train, eval): a fixed, seeded held-out set of `eval_size` examples."""
  return training_data.split_held_out(examples, eval_size, seed, "examples")


# --- Tokens: chat template, response-only loss mask --------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedData:
  """Conversations as rows of token ids, padded to seq_len + 1."""

  tokens_NL: np.ndarray  # int32 [N, seq_len + 1]
  lengths_N: np.ndarray  # tokens in each conversation (prompt + response)
  prompt_lens_N: np.ndarray  # tokens before the first response token

  @property
  def size(self) -> int:
    return len(self.lengths_N)

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for a in (self.tokens_NL, self.lengths_N, self.prompt_lens_N):
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def render(tok: Tokenizer, ex: Example) -> tuple[list[int], list[int]]:
  """(prompt ids, response ids): the response ends at its end-of-turn token.

  The prompt is the template's generation prompt, tokenized alone, so the
  model trains on exactly the prefix it will see when sampling; the response
  is the rest of the rendered conversation, cut after the end-of-turn token.
  """
  user = {"role": "user", "content": ex.prompt}
  prompt_text = tok.apply_chat_template([user], add_generation_prompt=True)
  full_text = tok.apply_chat_template(
      [user, {"role": "assistant", "content": ex.response}], add_generation_prompt=False)
  if not full_text.startswith(prompt_text):
    raise ValueError(f"{tok.source}: the chat template renders the conversation of"
                     f" {ex.id} with a different prefix than its generation prompt;"
                     " SFT needs a template where the assistant turn extends it")
  prompt_ids = tok.encode(prompt_text)
  response_ids = tok.encode(full_text[len(prompt_text):], add_bos=False)
  ends = [i for i, t in enumerate(response_ids) if t in tok.eos_ids]
  if ends:
    response_ids = response_ids[:ends[0] + 1]
  elif tok.eos_ids:
    response_ids = response_ids + [tok.eos_ids[0]]
  return prompt_ids, response_ids


def tokenize_examples(tok: Tokenizer, examples: Sequence[Example], seq_len: int,
                      truncation: str) -> TokenizedData:
  """Render and tokenize; over-long conversations are truncated or rejected.

  truncation="truncate" cuts the response to fit seq_len model inputs (and
  drops an example whose prompt alone fills them); "error" raises.
  """
  if truncation not in ("truncate", "error"):
    raise ValueError(f"data.truncation={truncation!r}: expected 'truncate' or 'error'")
  rows, prompt_lens, truncated, dropped = [], [], 0, 0
  for ex in examples:
    prompt_ids, response_ids = render(tok, ex)
    ids = prompt_ids + response_ids
    if len(ids) > seq_len + 1:
      if truncation == "error":
        raise ValueError(
            f"example {ex.id} ({ex.kind}) has {len(ids)} tokens, more than"
            f" data.seq_len + 1 = {seq_len + 1}; raise seq_len or set"
            " data.truncation='truncate'")
      if len(prompt_ids) >= seq_len:
        dropped += 1
        continue
      ids = ids[:seq_len + 1]
      truncated += 1
    rows.append(ids)
    prompt_lens.append(len(prompt_ids))
  if truncated or dropped:
    logging.warning("seq_len=%d: truncated %d responses, dropped %d examples whose"
                    " prompt alone is too long", seq_len, truncated, dropped)
  tokens = np.full((len(rows), seq_len + 1), tok.pad_id, np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
  return TokenizedData(tokens, np.asarray([len(r) for r in rows], np.int32),
                       np.asarray(prompt_lens, np.int32))


def make_batch(data: TokenizedData, rows: np.ndarray, T: int, pad_id: int
               ) -> dict[str, np.ndarray]:
  """[B, T] arrays for `rows` (-1: an all-padding row that adds nothing).

    inputs      tokens 0..T-1           targets    tokens 1..T
    input_mask  real input tokens       loss_mask  targets that are response
  """
  valid = rows >= 0
  tokens = np.full((len(rows), T + 1), pad_id, np.int32)
  tokens[valid] = data.tokens_NL[rows[valid], :T + 1]
  lengths = np.where(valid, data.lengths_N[np.maximum(rows, 0)], 0)
  prompt = np.where(valid, data.prompt_lens_N[np.maximum(rows, 0)], 0)
  t = np.arange(T)[None]
  input_mask = t < (lengths - 1)[:, None]
  loss_mask = input_mask & (t >= (prompt - 1)[:, None])
  return {"inputs": tokens[:, :T], "targets": tokens[:, 1:], "input_mask": input_mask,
          "loss_mask": loss_mask}


# --- Data order: a function of (seed, epoch) ---------------------------------------------


def bucket_of(data: TokenizedData, buckets: Sequence[int]) -> np.ndarray:
  """The smallest bucket length that holds each conversation's model inputs."""
  edges = np.asarray(sorted(buckets))
  return edges[np.searchsorted(edges, data.lengths_N - 1)]


def epoch_batches(buckets_N: np.ndarray, batch_size: int, seed: int, epoch: int
                  ) -> list[tuple[int, np.ndarray]]:
  """(bucket length, row indices) per batch, in this epoch's shuffled order.

  Rows are shuffled, grouped by bucket, cut into batches (the last of each
  bucket padded with -1) and the batches shuffled again. The number of
  batches is the same every epoch.
  """
  rng = np.random.default_rng([seed, 2, epoch])
  order = rng.permutation(len(buckets_N))
  batches = []
  for T in np.unique(buckets_N):
    rows = order[buckets_N[order] == T]
    pad = -len(rows) % batch_size
    rows = np.concatenate([rows, np.full(pad, -1, rows.dtype)])
    batches += [(int(T), b) for b in rows.reshape(-1, batch_size)]
  return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(buckets_N: np.ndarray, batch_size: int) -> list[tuple[int, np.ndarray]]:
  """The held-out set in a fixed order, batched by bucket."""
  out = []
  for T in np.unique(buckets_N):
    rows = np.flatnonzero(buckets_N == T)
    rows = np.concatenate([rows, np.full(-len(rows) % batch_size, -1, rows.dtype)])
    out += [(int(T), b) for b in rows.reshape(-1, batch_size)]
  return out


def batches_per_epoch(buckets_N: np.ndarray, batch_size: int) -> int:
  return sum(-(-int(n) // batch_size) for n in np.unique(buckets_N, return_counts=True)[1])


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
              ) -> dict[str, jax.Array]:
  """Host batch -> global arrays; every process holds the whole (small) batch."""
  return {k: distributed.to_global(v, sharding) for k, v in batch.items()}


# --- The train step ----------------------------------------------------------------------


def sft_loss_fn(params, batch, *, cfg: ModelConfig, sharder: Sharder | None,
                loss_chunk: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss sum, stats) of one microbatch; `loss_chunk` > 0 avoids [B,T,V] logits."""
  x_BTD, _ = transformer.hidden_states(params, batch["inputs"], cfg,
                                       mask_BT=batch["input_mask"], sharder=sharder)
  unembed = lambda x: transformer.logits_from_hidden(params, x, cfg, sharder)
  if loss_chunk:
    total, count = losses.chunked_sft_loss(x_BTD, unembed, batch["targets"],
                                           batch["loss_mask"], loss_chunk)
  else:
    total, count = losses.sft_loss(unembed(x_BTD), batch["targets"], batch["loss_mask"])
  tokens = jnp.sum(batch["input_mask"].astype(jnp.float32))
  return total, {"loss_sum": total, "loss_tokens": count, "tokens": tokens}


def train_step(state: optim.TrainState, batch, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               sharder: Sharder | None, microbatches: int, loss_chunk: int
               ) -> tuple[optim.TrainState, dict[str, jax.Array]]:
  """One AdamW update on the mean response-token NLL of the whole batch."""
  loss_fn = functools.partial(sft_loss_fn, cfg=cfg, sharder=sharder, loss_chunk=loss_chunk)
  grads, stats = optim.accumulate_gradients(loss_fn, state.params, batch, microbatches,
                                            sharder)
  count = jnp.maximum(stats["loss_tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  new_state = optim.apply_gradients(state, grads, tx)
  loss = stats["loss_sum"] / count
  params_finite = jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params)]))
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "lr": schedule(state.step), "tokens": stats["tokens"],
             "loss_tokens": stats["loss_tokens"],
             "finite": jnp.isfinite(loss) & params_finite}
  return new_state, metrics


def eval_step(params, batch, *, cfg: ModelConfig, sharder: Sharder | None,
              loss_chunk: int) -> tuple[jax.Array, jax.Array]:
  total, stats = sft_loss_fn(params, batch, cfg=cfg, sharder=sharder, loss_chunk=loss_chunk)
  return total, stats["loss_tokens"]


# --- The run -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SFTResult:
  status: str  # "done" | "preempted"
  step: int
  metrics: dict[str, float]
  output_dir: str
  state: optim.TrainState | None = dataclasses.field(default=None, repr=False)


def _check_batching(config: ml_collections.ConfigDict, sharder: Sharder) -> None:
  t = config.train
  if t.batch_size % t.microbatches:
    raise ValueError(f"train.batch_size={t.batch_size} is not a multiple of"
                     f" train.microbatches={t.microbatches}")
  shards = math.prod(sharder.mesh.shape[a] for a in dict(sharder.rules)["batch"])
  for name, size in (("microbatch", t.batch_size // t.microbatches),
                     ("eval_batch_size", t.eval_batch_size)):
    if size % shards:
      raise ValueError(f"{name} of {size} rows does not split over the {shards}"
                       f" batch shards of mesh {dict(sharder.mesh.shape)}")


def load_data(config: ml_collections.ConfigDict, workdir: str, tok: Tokenizer
              ) -> tuple[TokenizedData, TokenizedData]:
  """(train, eval) tokenized data from the critique-revision records."""
  d = config.data
  records_dir = d.records_dir or p2_critique_revision.output_dir(workdir)
  if not os.path.isdir(records_dir):
    raise FileNotFoundError(f"{records_dir}: no critique-revision records; run stage 2"
                            " (python -m cai_jax.phases.p2_critique_revision ...) or set"
                            " --config.data.records_dir")
  recs = records.read_records(records_dir, records.CritiqueRevisionRecord)
  examples = build_examples(recs, d.revision_round, d.helpful_ratio, config.seed)
  if len(examples) <= d.eval_size:
    raise ValueError(f"{records_dir}: {len(recs)} records give {len(examples)} usable SFT"
                     f" examples, need more than data.eval_size={d.eval_size}")
  train_ex, eval_ex = split_eval(examples, d.eval_size, config.seed)
  train = tokenize_examples(tok, train_ex, d.seq_len, d.truncation)
  held = tokenize_examples(tok, eval_ex, d.seq_len, d.truncation)
  if train.size == 0:
    raise ValueError(f"{records_dir}: no training example fits seq_len={d.seq_len}")
  return train, held


def run(config: ml_collections.ConfigDict, workdir: str, *,
        should_stop: Callable[[int], bool] | None = None) -> SFTResult:
  """Train (or resume) SFT; returns the final status, step and metrics.

  `should_stop(step)` is polled after every step, like SIGTERM: True saves a
  checkpoint and returns status "preempted". A non-finite loss or parameter
  stops the run without saving and raises FloatingPointError; the last
  checkpoint (all of whose steps were finite) is kept.
  """
  out = output_dir(workdir)
  t = config.train
  key = jax.random.key(config.seed)
  init_key, state_key = jax.random.split(key)

  # --- Mesh, model, data ---
  sharder = common.sharder_from_config(config)
  _check_batching(config, sharder)
  cfg, params, tok = load_sft_model(config, sharder, init_key)
  train, held = load_data(config, workdir, tok)
  buckets = sorted({*config.data.length_buckets, config.data.seq_len})
  if buckets[-1] != config.data.seq_len:
    raise ValueError(f"data.length_buckets {buckets} must not exceed seq_len")
  train_buckets, held_buckets = bucket_of(train, buckets), bucket_of(held, buckets)
  per_epoch = batches_per_epoch(train_buckets, t.batch_size)
  total_steps = t.num_steps or t.num_epochs * per_epoch
  logging.info("%d train / %d eval examples; %d steps (%d per epoch)", train.size,
               held.size, total_steps, per_epoch)

  # --- Optimizer, state, checkpoints ---
  abstract = transformer.abstract_params(cfg)
  param_sh = transformer.param_shardings(cfg, sharder)
  tx, schedule = optim.make_optimizer(config.optim, total_steps, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, param_sh, sharder)
  ckpt = checkpoint.Checkpointer(os.path.join(out, "checkpoints"),
                                 max_to_keep=t.keep_checkpoints)
  data_info = {"fingerprint": train.fingerprint(), "num_examples": train.size,
               "batch_size": t.batch_size, "seed": config.seed}
  init = jax.jit(lambda p, k: optim.init_train_state(p, tx, k),
                 out_shardings=state_sh, donate_argnums=0)
  if ckpt.latest_step() is not None:
    params = None  # superseded by the checkpoint: free it before restoring
  state = checkpoint.restore_or_init(
      ckpt, optim.abstract_train_state(tx, abstract, state_sh),
      lambda: init(params, state_key), expect=data_info)
  del params
  start = int(jax.device_get(state.step))

  # --- Jitted steps ---
  batch_sh = sharder.sharding(("batch", "seq"))
  step_fn = jax.jit(
      functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=sharder,
                        microbatches=t.microbatches, loss_chunk=t.loss_chunk),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharder.replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg, sharder=sharder,
                                      loss_chunk=t.loss_chunk),
                    in_shardings=(param_sh, batch_sh), out_shardings=sharder.replicated)

  def evaluate(params) -> float:
    total, count = 0.0, 0.0
    for T, rows in eval_batches(held_buckets, t.eval_batch_size):
      s, c = eval_fn(params, to_global(make_batch(held, rows, T, tok.pad_id), batch_sh))
      total, count = total + s, count + c
    return float(total) / max(float(count), 1.0)

  plans: dict[int, list] = {}

  def batch_at(step: int):
    epoch, i = divmod(step, per_epoch)
    if epoch not in plans:
      plans.clear()
      plans[epoch] = epoch_batches(train_buckets, t.batch_size, config.seed, epoch)
    T, rows = plans[epoch][i]
    return to_global(make_batch(train, rows, T, tok.pad_id), batch_sh)

  def position(step: int) -> dict[str, Any]:
    epoch, i = divmod(step, per_epoch)
    return {"step": step, "epoch": epoch, "batch_in_epoch": i,
            "total_steps": total_steps, **data_info}

  def summarize(fetched) -> dict[str, float]:
    return {"loss": float(np.mean([m["loss"] for m in fetched])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "lr": float(fetched[-1]["lr"]),
            "loss_tokens": float(sum(m["loss_tokens"] for m in fetched))}

  loop = train_loop.Loop(
      name="sft", step_fn=step_fn, batch_at=batch_at, position=position, summarize=summarize,
      units=lambda fetched: sum(float(m["tokens"]) for m in fetched), rate_name="tokens_per_s",
      evaluate=(lambda params, step: {"eval_loss": evaluate(params)}) if held.size else None,
      postfix=lambda last: {"loss": f"{last['loss']:.4f}"},
      save_every=t.save_every, eval_every=t.eval_every, log_every=t.log_every)
  status, state, last = train_loop.run(loop, state, start, total_steps, ckpt, out, should_stop)

  step = int(jax.device_get(state.step))
  if status == "done":
    export_hf(state.params, cfg, tok, os.path.join(out, "hf"), step)
  return SFTResult(status, step, last, out, state)


def export_hf(params, cfg: ModelConfig, tok: Tokenizer, path: str, step: int) -> None:
  """The final params as a Hugging Face directory (gathered to process 0).

  Skipped when `path` already holds the export of this step, so rerunning a
  finished stage leaves its files (and what later stages derived from them)
  untouched.
  """
  marker = os.path.join(path, "cai_jax_export.json")
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f).get("step") == step:
        return
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    hf.save_hf(params, cfg, path, tokenizer=tok)
    with open(marker, "w") as f:
      json.dump({"step": step}, f)
    logging.info("exported %s", path)


if __name__ == "__main__":
  cli.main(run)
