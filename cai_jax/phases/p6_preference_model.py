"""Stage 6 (RL-CAI): the preference model, an LM with a scalar head, Bradley-Terry.

Comparisons are (prompt, response a, response b, p = P(a preferred)):
  * harmlessness: stage 5's AI labels on red-team pairs (soft p);
  * helpfulness: human chosen/rejected pairs from `data.helpful_comparisons`
    (a JSONL / JSON / CSV / Parquet file with prompt, chosen and rejected
    columns, read with `datasets`; p = 1 for chosen) when given, else stage
    5's AI labels on helpful pairs.
They are mixed at `data.helpful_ratio` (the larger side is subsampled with the
seed) and split, seeded, into train and held-out pairs.

Each response is scored as the chat [user: prompt, assistant: response] cut
after the assistant's end-of-turn token, the score read at that token
(`heads.sequence_scores`): the same tokens the PPO policy produces when it
stops. Over-long conversations lose their *start* (the score's token must
stay). Both members of a pair go through one [2B, T] forward and the loss is
`losses.bradley_terry_loss`. The data order is a function of (seed, epoch),
so a resumed run reproduces the uninterrupted run bit for bit.

Eval: loss, accuracy (r_a > r_b agrees with p > 0.5; p = 0.5 pairs left out),
accuracy per kind, reward mean/std and the expected calibration error of
sigma(r_a - r_b) against p, with its reliability table written to
`calibration/step-NNNNNNN.json`.

Output, under `<workdir>/p6_preference_model/`:
  checkpoints/   Orbax (params {"backbone", "head"}, optimizer, PRNG key, data
                 position); `restore_preference_model` reads the params
  model/         model_config.json (the ModelConfig), pm.json (seq_len,
                 system prompt, source model) and the tokenizer files
  metrics.jsonl, tensorboard/, calibration/

  python -m cai_jax.phases.p6_preference_model \
      --config=configs/preference_model.py:cpu --workdir=runs/cai
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cai_jax import distributed, records
from cai_jax.checkpoints.load import load_model
from cai_jax.model import heads, transformer
from cai_jax.model.config import Llama3RopeScaling, ModelConfig
from cai_jax.model.sharding import Sharder
from cai_jax.phases import cli, common, p3_sft, p5_ai_labels
from cai_jax.tokenizer import Tokenizer
from cai_jax.training import checkpoint, losses, optim
from cai_jax.training import data as training_data
from cai_jax.training import loop as train_loop

OUT = "p6_preference_model"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"


def output_dir(workdir: str) -> str:
  return os.path.join(workdir, OUT)


# --- Comparisons: AI harmlessness labels + helpfulness pairs -----------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
  id: str
  kind: str  # "red_team" | "helpful"
  prompt: str
  response_a: str
  response_b: str
  p_a: float  # P(response_a preferred)


def read_ai_labels(labels_dir: str) -> list[Comparison]:
  """Stage 5's `LabelRecord`s as comparisons (every kind)."""
  recs = records.read_records(labels_dir, records.LabelRecord)
  out = []
  for r in recs:
    if not 0.0 <= r.p_a <= 1.0 or not math.isfinite(r.p_a):
      raise ValueError(f"{labels_dir}: record {r.id} has p_a={r.p_a}, outside [0, 1]")
    out.append(Comparison(r.id, r.kind, r.prompt, r.response_a, r.response_b, float(r.p_a)))
  return out


_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_human_comparisons(path: str) -> list[Comparison]:
  """Human helpfulness comparisons: prompt, chosen, rejected columns -> p_a = 1."""
  import datasets
  ext = os.path.splitext(path)[1].lower()
  if ext not in _BUILDERS:
    raise ValueError(f"data.helpful_comparisons={path}: expected a {sorted(_BUILDERS)} file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.helpful_comparisons={path}: no such file")
  ds = datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train")
  missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
  if missing:
    raise ValueError(f"{path}: missing column(s) {sorted(missing)}; have {ds.column_names}"
                     " (each row needs the prompt and the chosen and rejected responses)")
  ids = ds["id"] if "id" in ds.column_names else [f"human-{i}" for i in range(len(ds))]
  return [Comparison(str(i), "helpful", p, c, r, 1.0)
          for i, p, c, r in zip(ids, ds["prompt"], ds["chosen"], ds["rejected"])]


def mix(harmless: Sequence[Comparison], helpful: Sequence[Comparison],
        helpful_ratio: float | None, seed: int) -> list[Comparison]:
  """`helpful_ratio` of the result is helpful; the larger side is subsampled.

  None keeps everything, and so does a ratio strictly inside (0, 1) when one
  side is empty (with a warning: there is nothing to mix). Order: harmless
  then helpful, each in input order.
  """
  harmless, helpful = training_data.mix_by_ratio(
      harmless, helpful, helpful_ratio, np.random.default_rng([seed, 3]),
      ("harmlessness", "helpful"))
  return harmless + helpful


def split_eval(comparisons: Sequence[Comparison], eval_size: int, seed: int
               ) -> tuple[list[Comparison], list[Comparison]]:
  """(train, held-out): a fixed, seeded held-out set of `eval_size` pairs."""
  return training_data.split_held_out(comparisons, eval_size, seed, "pairs")


def load_comparisons(config: ml_collections.ConfigDict, workdir: str
                     ) -> tuple[list[Comparison], list[Comparison]]:
  """(train, held-out) comparisons for the config's data mix."""
  d = config.data
  labels_dir = d.labels_dir or p5_ai_labels.output_dir(workdir)
  human = d.helpful_comparisons
  ai: list[Comparison] = []
  if os.path.isdir(labels_dir) and records.completed_shards(labels_dir):
    ai = read_ai_labels(labels_dir)
  elif not (human and d.helpful_ratio == 1.0):
    raise FileNotFoundError(f"{labels_dir}: no AI label records; run stage 5"
                            " (python -m cai_jax.phases.p5_ai_labels ...) or set"
                            " --config.data.labels_dir")
  harmless = [c for c in ai if c.kind == "red_team"]
  helpful = read_human_comparisons(human) if human else [c for c in ai if c.kind == "helpful"]
  comparisons = mix(harmless, helpful, d.helpful_ratio, config.seed)
  logging.info("PM mix: %d harmlessness (AI) + %d helpfulness (%s) comparisons",
               sum(c.kind == "red_team" for c in comparisons),
               sum(c.kind == "helpful" for c in comparisons), "human" if human else "AI")
  if len(comparisons) <= d.eval_size:
    raise ValueError(f"{len(comparisons)} comparisons, need more than"
                     f" data.eval_size={d.eval_size}")
  return split_eval(comparisons, d.eval_size, config.seed)


# --- Tokens: [N, 2, T] rows, the score's token last ------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
  """Both conversations of each pair, right-padded to seq_len."""

  tokens_N2T: np.ndarray  # int32 [N, 2, seq_len]
  lengths_N2: np.ndarray  # real tokens of each conversation
  p_a_N: np.ndarray  # float32 soft labels
  red_team_N: np.ndarray  # bool: a harmlessness comparison

  @property
  def size(self) -> int:
    return len(self.p_a_N)

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for a in (self.tokens_N2T, self.lengths_N2, self.p_a_N, self.red_team_N):
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def conversation_ids(tok: Tokenizer, prompt: str, response: str) -> list[int]:
  """[user: prompt, assistant: response] up to and including the end-of-turn token."""
  ex = p3_sft.Example("", "", prompt, response)
  prompt_ids, response_ids = p3_sft.render(tok, ex)
  return prompt_ids + response_ids


def fit(ids: list[int], seq_len: int, truncation: str, what: str) -> tuple[list[int], bool]:
  """(ids, truncated): too-long conversations keep their last seq_len tokens."""
  if len(ids) <= seq_len:
    return ids, False
  if truncation == "error":
    raise ValueError(f"{what} has {len(ids)} tokens, more than data.seq_len={seq_len};"
                     " raise seq_len or set data.truncation='truncate'")
  return ids[-seq_len:], True


def tokenize_pairs(tok: Tokenizer, comparisons: Sequence[Comparison], seq_len: int,
                   truncation: str) -> TokenizedPairs:
  if truncation not in ("truncate", "error"):
    raise ValueError(f"data.truncation={truncation!r}: expected 'truncate' or 'error'")
  N = len(comparisons)
  tokens = np.full((N, 2, seq_len), tok.pad_id, np.int32)
  lengths = np.zeros((N, 2), np.int32)
  truncated = 0
  for i, c in enumerate(comparisons):
    for j, response in enumerate((c.response_a, c.response_b)):
      ids, cut = fit(conversation_ids(tok, c.prompt, response), seq_len, truncation,
                     f"comparison {c.id} response {'ab'[j]}")
      truncated += cut
      tokens[i, j, :len(ids)] = ids
      lengths[i, j] = len(ids)
  if truncated:
    logging.warning("seq_len=%d: %d conversations lost their start", seq_len, truncated)
  return TokenizedPairs(tokens, lengths, np.asarray([c.p_a for c in comparisons], np.float32),
                        np.asarray([c.kind == "red_team" for c in comparisons], bool))


def make_batch(data: TokenizedPairs, rows: np.ndarray, T: int) -> dict[str, np.ndarray]:
  """[B, 2, T] tokens and mask, [B] labels for `rows` (-1: a padding pair)."""
  valid = rows >= 0
  safe = np.maximum(rows, 0)
  tokens = np.where(valid[:, None, None], data.tokens_N2T[safe, :, :T], 0).astype(np.int32)
  lengths = np.where(valid[:, None], data.lengths_N2[safe], 0)
  mask = np.arange(T)[None, None] < lengths[..., None]
  return {"tokens": tokens, "mask": mask,
          "p_a": np.where(valid, data.p_a_N[safe], 0.5).astype(np.float32),
          "valid": valid}


def buckets_of(data: TokenizedPairs, buckets: Sequence[int]) -> np.ndarray:
  """The smallest bucket length holding both conversations of each pair."""
  edges = np.asarray(sorted(buckets))
  return edges[np.searchsorted(edges, data.lengths_N2.max(axis=1))]


def batch_shardings(sharder: Sharder) -> dict[str, jax.sharding.Sharding]:
  """Pairs split over the batch axes; both members of a pair on one device."""
  return {"tokens": sharder.sharding(("batch", None, "seq")),
          "mask": sharder.sharding(("batch", None, "seq")),
          "p_a": sharder.sharding(("batch",)), "valid": sharder.sharding(("batch",))}


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding]
              ) -> dict[str, jax.Array]:
  return {k: distributed.to_global(v, shardings[k]) for k, v in batch.items()}


# --- The model -------------------------------------------------------------------------------


def abstract_scalar_params(cfg: ModelConfig) -> heads.Params:
  return {"backbone": transformer.abstract_params(cfg),
          "head": {"w": jax.ShapeDtypeStruct((cfg.dim,), jnp.float32),
                   "b": jax.ShapeDtypeStruct((), jnp.float32)}}


def pair_rewards(params: heads.Params, tokens_B2T: jax.Array, mask_B2T: jax.Array,
                 cfg: ModelConfig, sharder: Sharder | None) -> jax.Array:
  """[B, 2] rewards: one [2B, T] forward, pair b's members in rows 2b and 2b + 1."""
  B, _, T = tokens_B2T.shape
  rewards = heads.sequence_scores(params, tokens_B2T.reshape(2 * B, T), cfg,
                                  mask_BT=mask_B2T.reshape(2 * B, T), sharder=sharder)
  return rewards.reshape(B, 2)


def pm_loss_fn(params, batch, *, cfg: ModelConfig, sharder: Sharder | None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss sum, stats sums) of one microbatch of pairs."""
  r_B2 = pair_rewards(params, batch["tokens"], batch["mask"], cfg, sharder)
  valid_B = batch["valid"]
  total, count = losses.bradley_terry_loss(r_B2[:, 0], r_B2[:, 1], batch["p_a"], valid_B)
  p_B = batch["p_a"]
  decided_B = valid_B & (p_B != 0.5)
  agree_B = (r_B2[:, 0] > r_B2[:, 1]) == (p_B > 0.5)
  v_B1 = valid_B[:, None]
  r = jnp.where(v_B1, r_B2, 0.0)
  return total, {"loss_sum": total, "pairs": count,
                 "correct": jnp.sum((agree_B & decided_B).astype(jnp.float32)),
                 "decided": jnp.sum(decided_B.astype(jnp.float32)),
                 "reward_sum": jnp.sum(r), "reward_sq_sum": jnp.sum(r * r)}


def train_step(state: optim.TrainState, batch, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               sharder: Sharder | None, microbatches: int
               ) -> tuple[optim.TrainState, dict[str, jax.Array]]:
  """One AdamW update on the mean Bradley-Terry loss of the batch's pairs."""
  loss_fn = functools.partial(pm_loss_fn, cfg=cfg, sharder=sharder)
  grads, s = optim.accumulate_gradients(loss_fn, state.params, batch, microbatches, sharder)
  pairs = jnp.maximum(s["pairs"], 1.0)
  grads = jax.tree.map(lambda g: g / pairs, grads)
  new_state = optim.apply_gradients(state, grads, tx)
  loss = s["loss_sum"] / pairs
  mean = s["reward_sum"] / (2 * pairs)
  params_finite = jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params)]))
  metrics = {"loss": loss, "accuracy": s["correct"] / jnp.maximum(s["decided"], 1.0),
             "reward_mean": mean,
             "reward_std": jnp.sqrt(jnp.maximum(s["reward_sq_sum"] / (2 * pairs) - mean**2, 0.0)),
             "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
             "finite": jnp.isfinite(loss) & params_finite}
  return new_state, metrics


def eval_step(params, batch, *, cfg: ModelConfig, sharder: Sharder | None) -> jax.Array:
  return pair_rewards(params, batch["tokens"], batch["mask"], cfg, sharder)


# --- Evaluation: accuracy and calibration ------------------------------------------------------


def calibration(pred_N: np.ndarray, label_N: np.ndarray, num_bins: int
                ) -> tuple[float, list[dict[str, float]]]:
  """Expected calibration error and its reliability table.

  pred = sigma(r_a - r_b), the model's P(a preferred); label = the soft label
  p. Bins of equal width over [0, 1]:
    ECE = sum_bins n_bin / N * |mean pred_bin - mean label_bin|
  A model whose P(a > b) = q is right a fraction q of the time has ECE ~ 0.
  """
  pred_N, label_N = np.asarray(pred_N, np.float64), np.asarray(label_N, np.float64)
  idx_N = np.minimum((pred_N * num_bins).astype(np.int64), num_bins - 1)
  table, ece = [], 0.0
  for b in range(num_bins):
    sel = idx_N == b
    n = int(sel.sum())
    row = {"lo": b / num_bins, "hi": (b + 1) / num_bins, "count": n,
           "mean_pred": float(pred_N[sel].mean()) if n else float("nan"),
           "mean_label": float(label_N[sel].mean()) if n else float("nan")}
    if n:
      ece += n / len(pred_N) * abs(row["mean_pred"] - row["mean_label"])
    table.append(row)
  return float(ece), table


def eval_metrics(rewards_N2: np.ndarray, data: TokenizedPairs, num_bins: int
                 ) -> tuple[dict[str, float], list[dict[str, float]]]:
  """Held-out scalars and the reliability table, from every pair's two rewards."""
  r = np.asarray(rewards_N2, np.float64)
  d_N, p_N = r[:, 0] - r[:, 1], data.p_a_N.astype(np.float64)
  nll_N = p_N * np.logaddexp(0.0, -d_N) + (1 - p_N) * np.logaddexp(0.0, d_N)
  decided_N = p_N != 0.5
  agree_N = (d_N > 0) == (p_N > 0.5)
  pred_N = 0.5 * (1.0 + np.tanh(0.5 * d_N))  # sigma(d) without overflow
  ece, table = calibration(pred_N, p_N, num_bins)
  out = {"eval_loss": float(nll_N.mean()),
         "eval_accuracy": float(agree_N[decided_N].mean()) if decided_N.any() else float("nan"),
         "eval_ece": ece, "eval_reward_mean": float(r.mean()),
         "eval_reward_std": float(r.std())}
  for name, sel in (("red_team", data.red_team_N), ("helpful", ~data.red_team_N)):
    if (sel & decided_N).any():
      out[f"eval_accuracy_{name}"] = float(agree_N[sel & decided_N].mean())
  return out, table


def write_calibration(out: str, step: int, metrics: dict[str, float],
                      table: list[dict[str, float]]) -> str:
  path = os.path.join(out, "calibration", f"step-{step:07d}.json")
  if distributed.is_leader():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    clean = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None
    with open(path + ".tmp", "w") as f:
      json.dump({"step": step, **{k: clean(v) for k, v in metrics.items()},
                 "bins": [{k: clean(v) for k, v in row.items()} for row in table]},
                f, indent=1)
    os.replace(path + ".tmp", path)
  return path


# --- Saved model: config + tokenizer beside the Orbax params -------------------------------------


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def config_from_json(d: dict[str, Any]) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = Llama3RopeScaling(**d["rope_scaling"])
  for k in ("layer_types", "eos_token_ids"):
    d[k] = tuple(d[k])
  return ModelConfig(**d)


def save_model_files(path: str, cfg: ModelConfig, tok: Tokenizer, info: dict[str, Any]
                     ) -> None:
  """model_config.json + pm.json + tokenizer files (process 0, atomically)."""
  if not distributed.is_leader():
    return
  tmp = path.rstrip("/") + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  with open(os.path.join(tmp, "model_config.json"), "w") as f:
    json.dump(config_to_json(cfg), f, indent=1)
  with open(os.path.join(tmp, "pm.json"), "w") as f:
    json.dump({**info, "system_prompt": tok.default_system_prompt}, f, indent=1)
  tok.save(tmp)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)


def _pm_dir(path: str) -> str:
  """Accepts the pipeline workdir or the stage's own output directory."""
  for candidate in (path, output_dir(path)):
    if os.path.isdir(os.path.join(candidate, MODEL_DIR)):
      return candidate
  raise FileNotFoundError(f"{path}: no trained preference model (expected"
                          f" {output_dir(path)}/{MODEL_DIR}); run stage 6 first")


def restore_preference_model(path: str, sharder: Sharder, step: int | None = None
                             ) -> tuple[ModelConfig, heads.Params, Tokenizer]:
  """(cfg, params {"backbone", "head"} in their shardings, tokenizer) of a trained PM.

  `path`: the pipeline workdir or `<workdir>/p6_preference_model`. The params
  come from the Orbax checkpoint (default: the latest step) restored into
  `eval_shape` targets carrying `sharder`'s shardings, so any mesh works.
  """
  pm = _pm_dir(path)
  model = os.path.join(pm, MODEL_DIR)
  with open(os.path.join(model, "model_config.json")) as f:
    cfg = config_from_json(json.load(f))
  with open(os.path.join(model, "pm.json")) as f:
    info = json.load(f)
  tok = Tokenizer.from_dir(model).with_system_prompt(info.get("system_prompt"))
  shardings = heads.scalar_model_shardings(cfg, sharder)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_scalar_params(cfg), shardings)
  params = checkpoint.restore_params(os.path.join(pm, CHECKPOINTS), target, step)
  return cfg, params, tok


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_rows(params, tokens_BT, mask_BT, cfg: ModelConfig) -> jax.Array:
  return heads.sequence_scores(params, tokens_BT, cfg, mask_BT=mask_BT)


def score(params: heads.Params, cfg: ModelConfig, tok: Tokenizer, prompts: Sequence[str],
          responses: Sequence[str], batch_size: int = 8, seq_len: int | None = None
          ) -> np.ndarray:
  """PM rewards [N] of (prompt, response) pairs, for evaluation (one process).

  Rendered like training (the score read at the end-of-turn token); rows
  longer than `seq_len` (default cfg.max_seq_len) lose their start. Lengths
  are padded to a power of two so few shapes compile.
  """
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
  seq_len = seq_len or cfg.max_seq_len
  rows = [fit(conversation_ids(tok, p, r), seq_len, "truncate", "")[0]
          for p, r in zip(prompts, responses)]
  out = np.zeros(len(rows), np.float32)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    T = min(max(32, 1 << (max(len(r) for r in chunk) - 1).bit_length()), seq_len)
    tokens = np.full((batch_size, T), tok.pad_id, np.int32)
    mask = np.zeros((batch_size, T), bool)
    for i, ids in enumerate(chunk):
      tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
    scores = np.asarray(_score_rows(params, tokens, mask, cfg))
    out[start:start + len(chunk)] = scores[:len(chunk)]
  return out


# --- The run -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PMResult:
  status: str  # "done" | "preempted"
  step: int
  metrics: dict[str, float]
  output_dir: str
  state: optim.TrainState | None = dataclasses.field(default=None, repr=False)


def model_spec(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.model`, or "": stage 3's export if present, else `config.fallback_model`."""
  if config.model:
    return config.model
  sft = os.path.join(p3_sft.output_dir(workdir), "hf")
  return sft if os.path.isdir(sft) else config.fallback_model


def load_pm_model(config: ml_collections.ConfigDict, workdir: str, sharder: Sharder,
                  key: jax.Array) -> tuple[ModelConfig, heads.Params, Tokenizer, str]:
  """(cfg, {"backbone", "head"} in their shardings, tokenizer, spec): LM + fresh head."""
  backbone_key, head_key = jax.random.split(key)
  spec = model_spec(config, workdir)
  cfg, backbone, tok = load_model(spec, sharder, tokenizer=config.tokenizer,
                                  key=backbone_key, **dict(config.model_overrides))
  head = jax.jit(functools.partial(heads.init_head, cfg),
                 out_shardings=heads.head_shardings(cfg, sharder))(head_key)
  logging.info("PM backbone %s: %s, %.1fM params; %r", spec, cfg.family,
               cfg.num_params() / 1e6, tok)
  return cfg, {"backbone": backbone, "head": head}, tok, spec


def _check_batching(config: ml_collections.ConfigDict, sharder: Sharder) -> None:
  t = config.train
  if t.batch_size % t.microbatches:
    raise ValueError(f"train.batch_size={t.batch_size} is not a multiple of"
                     f" train.microbatches={t.microbatches}")
  shards = math.prod(sharder.mesh.shape[a] for a in dict(sharder.rules)["batch"])
  for name, size in (("microbatch", t.batch_size // t.microbatches),
                     ("eval_batch_size", t.eval_batch_size)):
    if size % shards:
      raise ValueError(f"{name} of {size} pairs does not split over the {shards}"
                       f" batch shards of mesh {dict(sharder.mesh.shape)}")


def run(config: ml_collections.ConfigDict, workdir: str, *,
        should_stop: Callable[[int], bool] | None = None) -> PMResult:
  """Train (or resume) the preference model; returns the status, step and metrics.

  `should_stop(step)` is polled after every step, like SIGTERM: True saves a
  checkpoint and returns "preempted". A non-finite loss or parameter raises
  FloatingPointError without saving; the last (finite) checkpoint is kept.
  """
  out = output_dir(workdir)
  t, d = config.train, config.data
  init_key, state_key = jax.random.split(jax.random.key(config.seed))

  # --- Mesh, model, comparisons ---
  sharder = common.sharder_from_config(config)
  _check_batching(config, sharder)
  train_c, held_c = load_comparisons(config, workdir)
  cfg, params, tok, spec = load_pm_model(config, workdir, sharder, init_key)
  train = tokenize_pairs(tok, train_c, d.seq_len, d.truncation)
  held = tokenize_pairs(tok, held_c, d.seq_len, d.truncation)
  buckets = sorted({*d.length_buckets, d.seq_len})
  if buckets[-1] != d.seq_len:
    raise ValueError(f"data.length_buckets {buckets} must not exceed seq_len")
  train_buckets, held_buckets = buckets_of(train, buckets), buckets_of(held, buckets)
  per_epoch = p3_sft.batches_per_epoch(train_buckets, t.batch_size)
  total_steps = t.num_steps or t.num_epochs * per_epoch
  logging.info("%d train / %d held-out pairs; %d steps (%d per epoch)", train.size,
               held.size, total_steps, per_epoch)
  save_model_files(os.path.join(out, MODEL_DIR), cfg, tok,
                   {"source_model": spec, "seq_len": d.seq_len})

  # --- Optimizer, state, checkpoints ---
  abstract = abstract_scalar_params(cfg)
  param_sh = heads.scalar_model_shardings(cfg, sharder)
  tx, schedule = optim.make_optimizer(config.optim, total_steps, abstract)
  state_sh = optim.train_state_shardings(tx, abstract, param_sh, sharder)
  ckpt = checkpoint.Checkpointer(os.path.join(out, CHECKPOINTS),
                                 max_to_keep=t.keep_checkpoints)
  data_info = {"fingerprint": train.fingerprint(), "num_pairs": train.size,
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
  batch_sh = batch_shardings(sharder)
  step_fn = jax.jit(
      functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule, sharder=sharder,
                        microbatches=t.microbatches),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharder.replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg, sharder=sharder),
                    in_shardings=(param_sh, batch_sh), out_shardings=sharder.replicated)

  def evaluate(params, step: int) -> dict[str, float]:
    rewards_N2 = np.zeros((held.size, 2), np.float32)
    for T, rows in p3_sft.eval_batches(held_buckets, t.eval_batch_size):
      r_B2 = np.asarray(jax.device_get(eval_fn(params, to_global(
          make_batch(held, rows, T), batch_sh))))
      rewards_N2[rows[rows >= 0]] = r_B2[rows >= 0]
    metrics, table = eval_metrics(rewards_N2, held, config.eval.num_bins)
    write_calibration(out, step, metrics, table)
    return metrics

  plans: dict[int, list] = {}

  def batch_at(step: int):
    epoch, i = divmod(step, per_epoch)
    if epoch not in plans:
      plans.clear()
      plans[epoch] = p3_sft.epoch_batches(train_buckets, t.batch_size, config.seed, epoch)
    T, rows = plans[epoch][i]
    return to_global(make_batch(train, rows, T), batch_sh)

  def position(step: int) -> dict[str, Any]:
    epoch, i = divmod(step, per_epoch)
    return {"step": step, "epoch": epoch, "batch_in_epoch": i,
            "total_steps": total_steps, **data_info}

  def summarize(fetched) -> dict[str, float]:
    last = train_loop.mean_of(("loss", "accuracy", "reward_mean", "reward_std",
                               "grad_norm"))(fetched)
    return {**last, "lr": float(fetched[-1]["lr"])}

  loop = train_loop.Loop(
      name="pm", step_fn=step_fn, batch_at=batch_at, position=position, summarize=summarize,
      units=lambda fetched: len(fetched) * t.batch_size, rate_name="pairs_per_s",
      evaluate=evaluate if held.size else None,
      postfix=lambda last: {"loss": f"{last['loss']:.4f}", "acc": f"{last['accuracy']:.2f}"},
      save_every=t.save_every, eval_every=t.eval_every, log_every=t.log_every)
  status, state, last = train_loop.run(loop, state, start, total_steps, ckpt, out, should_stop)

  return PMResult(status, int(jax.device_get(state.step)), last, out, state)


if __name__ == "__main__":
  cli.main(run)
