"""A mutation score: one-line changes to the library's core, each run against the tests
that should catch it.

  python -m benchmarks.robustness.mutations [--only=name,name] [--timeout=300]
      [--out=benchmarks/results/cpu/mutations.json]

Each mutation replaces one exact piece of text of one file (it must occur exactly once) in
a copy of the repository, runs its tests there (`pytest -x -n 0 <tests>`) with a time
limit, and is *killed* when a test fails, the run errors or it times out, and *survives*
when its tests pass. Before any mutation, every distinct test selection runs once on the
unchanged copy and must pass, so a kill means the mutation, not a broken test. A new
mutation is one `Mutation(...)` line in MUTATIONS. A survivor is either killed by a new
test or named in EQUIVALENT with why it keeps behaviour identical.

The copy shares one JAX compilation cache across runs (programs are keyed by their HLO, so
a mutated program compiles anew and an unchanged one is read back). Writes a JSON result:
each mutation's outcome, seconds and the first failing test, and the score.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COPIED = ("cai_jax", "configs", "constitutions", "tests", "benchmarks", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  file: str  # relative to the repository
  old: str  # exact text, found once in the file
  new: str
  tests: str  # pytest arguments: files and an optional -k expression

  def apply(self, text: str) -> str:
    count = text.count(self.old)
    if count != 1:
      raise ValueError(f"mutation {self.name}: {self.file} holds {self.old!r} {count} times,"
                       " not once; make `old` unique")
    return text.replace(self.old, self.new)


M = Mutation
S, PPO, PM, DPO = ("tests/test_sampler.py", "tests/test_ppo.py",
                   "tests/test_preference_model.py", "tests/test_dpo.py")
LOSS, LEARN, CFREE, LABELS_T, REFUSAL_T, INTERVALS_T = (
    "tests/test_losses.py", "tests/test_learner.py", "tests/test_critic_free.py",
    "tests/test_labels.py", "tests/test_refusal.py", "tests/test_intervals.py")
REW, SFT = "tests/test_reward.py", "tests/test_sft.py"
SAMPLER, LOSSES, RLPPO, CF, LEARNER = ("cai_jax/sampling/sampler.py", "cai_jax/training/losses.py",
                                       "cai_jax/rl/ppo.py", "cai_jax/rl/critic_free.py",
                                       "cai_jax/rl/learner.py")
LABELS, REFUSAL, INTERVALS = ("cai_jax/feedback/labels.py", "cai_jax/evaluation/refusal.py",
                              "cai_jax/evaluation/intervals.py")
MUTATIONS: tuple[Mutation, ...] = (
    # The sampler: its key schedule, temperature, filters, stop tokens and log-probs.
    M("sampler_key_of_step_0", SAMPLER, "jax.random.fold_in(key, step)",
      "jax.random.fold_in(key, 0)", f"{S} -k 'fold_in or flat'"),
    M("sampler_draws_at_t_1", SAMPLER, "categorical(key, _filter_logits(scaled_V, sampling))",
      "categorical(key, _filter_logits(scaled_V * sampling.temperature, sampling))",
      f"{S} -k 'fold_in or frequencies'"),
    M("sampler_top_k_keeps_one", SAMPLER, "top_k(logits_V, sampling.top_k)[0][-1]",
      "top_k(logits_V, sampling.top_k)[0][0]", f"{S} -k 'fold_in or frequencies'"),
    M("sampler_top_p_keeps_one_more", SAMPLER, "sorted_V[jnp.minimum(cutoff_idx, ",
      "sorted_V[jnp.minimum(cutoff_idx + 1, ", f"{S} -k 'fold_in or frequencies'"),
    M("sampler_no_pad_after_stop", SAMPLER, "tok_B = jnp.where(s.done_B, pad_id, tok_B)",
      "tok_B = tok_B", f"{S} -k stop"),
    M("sampler_length_counts_padding", SAMPLER,
      "lengths_B=s.lengths_B + (~s.done_B).astype(jnp.int32)", "lengths_B=s.lengths_B + 1",
      f"{S} -k stop"),
    M("sampler_logprob_unnormalised", SAMPLER,
      "return tokens_B, picked_B - jax.nn.logsumexp(scaled_BV, axis=-1)",
      "return tokens_B, picked_B", f"{S} -k 'logprobs or fold_in'"),
    M("sampler_greedy_takes_last_max", SAMPLER,
      "first_B = jnp.min(jnp.where(is_max_BV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)",
      "first_B = jnp.max(jnp.where(is_max_BV, jnp.arange(V, dtype=jnp.int32), -1), axis=-1)",
      f"{S} -k argmax"),
    # Losses.
    M("bt_loss_label_swapped", LOSSES,
      "nll_B = p_B * jax.nn.softplus(-d_B) + (1.0 - p_B) * jax.nn.softplus(d_B)",
      "nll_B = (1.0 - p_B) * jax.nn.softplus(-d_B) + p_B * jax.nn.softplus(d_B)",
      f"{LOSS} -k bradley_terry"),
    M("bt_loss_mask_ignored", LOSSES,
      "return jnp.sum(jnp.where(mask_B > 0, nll_B * mask_B, 0.0)), jnp.sum(mask_B)",
      "return jnp.sum(nll_B), jnp.sum(mask_B)", f"{LOSS} -k bradley_terry"),
    M("dpo_loss_without_beta", LOSSES,
      "return bradley_terry_loss(beta * la_B, beta * lb_B, p_a_B, mask_B)",
      "return bradley_terry_loss(la_B, lb_B, p_a_B, mask_B)", f"{LOSS} -k soft_sigmoid"),
    M("ipo_target_hard", LOSSES, "per_B = (h_B - (2.0 * p_B - 1.0) / (2.0 * beta)) ** 2",
      "per_B = (h_B - 1.0 / (2.0 * beta)) ** 2", f"{LOSS} -k ipo"),
    M("sft_loss_mask_ignored", LOSSES,
      "return jnp.sum(jnp.where(mask_BT > 0, nll_BT * mask_BT, 0.0)), jnp.sum(mask_BT)",
      "return jnp.sum(nll_BT), jnp.sum(mask_BT)", f"{LOSS} {SFT} -k 'cross_entropy or prompt_labels'"),
    M("sft_log_probs_unnormalised", LOSSES, "return target_BT - lse_BT", "return target_BT",
      f"{LOSS} -k cross_entropy"),
    # RL math.
    M("score_on_the_token_after_the_last", RLPPO,
      "last_B = jnp.sum(mask_BM, axis=1).astype(jnp.int32) - 1",
      "last_B = jnp.sum(mask_BM, axis=1).astype(jnp.int32)",
      f"{PPO} {LEARN} -k 'whiten_and_token or learner_advantages'"),
    M("whiten_without_scaling", RLPPO, "out = (x_BM - mean) * jax.lax.rsqrt(var + eps)",
      "out = x_BM - mean", f"{PPO} {LEARN} -k 'whiten or learner_advantages'"),
    M("gae_without_lambda", RLPPO, "adv_B = delta_B + gamma * lam * next_mask_B * adv_next_B",
      "adv_B = delta_B + gamma * next_mask_B * adv_next_B", f"{PPO} -k gae"),
    M("kl_k3_ratio_inverted", RLPPO, "log_r = ref_logp_BM - logp_BM",
      "log_r = logp_BM - ref_logp_BM", f"{PPO} {LEARN} -k 'kl_estimators or learner'"),
    M("policy_loss_takes_the_optimistic_branch", RLPPO,
      "loss_BM = jnp.maximum(-adv_BM * ratio_BM,", "loss_BM = jnp.minimum(-adv_BM * ratio_BM,",
      f"{PPO} -k clipped_losses"),
    M("value_loss_takes_the_smaller", RLPPO, "loss_BM = 0.5 * jnp.maximum(jnp.square(",
      "loss_BM = 0.5 * jnp.minimum(jnp.square(", f"{PPO} -k clipped_losses"),
    M("adaptive_kl_unclipped", RLPPO, "error = min(max(kl / target - 1.0, -0.2), 0.2)",
      "error = kl / target - 1.0", f"{PPO} -k adaptive_kl"),
    M("rloo_baseline_includes_itself", CF,
      "baseline_QC = (jnp.sum(rewards_QC, axis=1, keepdims=True) - rewards_QC) / (C - 1)",
      "baseline_QC = jnp.mean(rewards_QC, axis=1, keepdims=True)", f"{CFREE} {LEARN} -k group"),
    M("grpo_std_without_bessel", CF, "std_Q1 = jnp.std(rewards_QC, axis=1, keepdims=True, ddof=1)",
      "std_Q1 = jnp.std(rewards_QC, axis=1, keepdims=True)", f"{CFREE} {LEARN} -k group"),
    M("sequence_reward_adds_kl", CF, "return jnp.asarray(scores_B, jnp.float32) - kl_coef * kl_B",
      "return jnp.asarray(scores_B, jnp.float32) + kl_coef * kl_B", f"{CFREE} {LEARN} -k group"),
    # Wiring: a tested function reaching the step that uses it.
    M("ppo_learner_without_kl_penalty", LEARNER,
      "rewards_BM = ppo.token_rewards(scores_B, kl_BM, mask_BM, kl_coef)",
      "rewards_BM = ppo.token_rewards(scores_B, kl_BM, mask_BM, 0.0)", f"{LEARN}"),
    M("group_learner_without_kl_penalty", LEARNER,
      "rewards_B = critic_free.sequence_rewards(scores_B, kl_BM, mask_BM, kl_coef)",
      "rewards_B = critic_free.sequence_rewards(scores_B, kl_BM, mask_BM, 0.0)",
      f"{LEARN} -k learner_group"),
    M("ppo_learner_whitens_rewards_always", LEARNER, "  if whiten_rewards:\n    rewards_BM",
      "  if True:\n    rewards_BM", f"{LEARN} -k learner_advantages"),
    M("rollout_rows_share_one_key", LEARNER,
      "keys = sequence_keys(rollout_key, list(range(B)))",
      "keys = sequence_keys(rollout_key, [0] * B)", "tests/e2e/test_p7_ppo.py -k 'programmatic and grpo'"),
    M("pm_step_rounds_soft_labels", "cai_jax/preference/model.py",
      'losses.bradley_terry_loss(r_B2[:, 0], r_B2[:, 1], batch["p_a"], valid_B)',
      'losses.bradley_terry_loss(r_B2[:, 0], r_B2[:, 1], jnp.where(batch["p_a"] == 0.5, 0.5,'
      ' jnp.round(batch["p_a"])), valid_B)', f"{PM} -k closed_form"),
    M("dpo_step_rounds_soft_labels", "cai_jax/rl/dpo.py",
      'losses.dpo_loss(ratio_B2[:, 0], ratio_B2[:, 1], batch["p_a"], beta,',
      'losses.dpo_loss(ratio_B2[:, 0], ratio_B2[:, 1], jnp.where(batch["p_a"] == 0.5, 0.5,'
      ' jnp.round(batch["p_a"])), beta,', f"{DPO} -k 'closed_form or half_minus'"),
    M("reward_normalisation_without_std", "cai_jax/rl/reward.py",
      "x = (x - m.mean) / (m.std + NORM_EPS)", "x = x - m.mean", f"{REW} -k normalisation"),
    # The feedback labeler's label math.
    M("choice_prob_inverted", LABELS,
      "return sigmoid(np.asarray(logp_A, np.float64) - np.asarray(logp_B, np.float64))",
      "return sigmoid(np.asarray(logp_B, np.float64) - np.asarray(logp_A, np.float64))",
      f"{LABELS_T} -k choice_prob"),
    M("cot_clamp_removed", LABELS,
      "return np.clip(np.asarray(margins, np.float64), logit(lo), logit(hi))",
      "return np.asarray(margins, np.float64)", f"{LABELS_T} -k clamp"),
    M("principles_ensembled_by_max", LABELS, "return np.asarray(p_K, np.float64).mean(axis=-1)",
      "return np.asarray(p_K, np.float64).max(axis=-1)", f"{LABELS_T} -k principle_ensemble"),
    M("orders_not_debiased", LABELS, "return sigmoid(margins_O.mean(axis=-1))",
      "return sigmoid(margins_O[..., 0])", f"{LABELS_T} -k order_swap"),
    # The refusal measure.
    M("refusal_drops_as_an_ai", REFUSAL, '    r"\\bas an ai\\b",\n', "",
      f"{REFUSAL_T} -k 'alternative or known_phrases'"),
    M("refusal_drops_decline_phrases", REFUSAL, "will not|must decline|", "will not|",
      f"{REFUSAL_T} -k 'alternative or known_phrases'"),
    M("warning_then_instructions_still_refuses", REFUSAL,
      "if warning and len(_NUMBERED.findall(text)) >= 3:",
      "if warning and len(_NUMBERED.findall(text)) >= 30:", f"{REFUSAL_T} -k warning_followed"),
    M("refusals_never_explain", REFUSAL,
      'return Verdict("refuses_explains" if explains else "refuses",',
      'return Verdict("refuses",', f"{REFUSAL_T} -k known_phrases"),
    # Intervals.
    M("wilson_without_continuity_centre", INTERVALS,
      "center = (p + z2 / (2 * n)) / (1 + z2 / n)", "center = p", f"{INTERVALS_T} -k wilson"),
    M("bootstrap_90_percent", INTERVALS, "lo, hi = np.percentile(values, [2.5, 97.5])",
      "lo, hi = np.percentile(values, [5, 95])", f"{INTERVALS_T} -k bootstrap"),
    M("paired_interval_unpaired", INTERVALS, "lo, hi = _percentile(da - db)",
      "lo, hi = _percentile(da - db[::-1])", f"{INTERVALS_T} -k paired"),
    # Data splits.
    M("held_out_split_not_shuffled", "cai_jax/data/batching.py",
      "held = set(order[:eval_size].tolist())", "held = set(range(eval_size))",
      "tests/test_batching.py"),
    M("rollout_prompts_same_every_epoch", "cai_jax/data/rollout_prompts.py",
      "order = np.random.default_rng([seed, 3, epoch]).permutation(n_prompts)",
      "order = np.random.default_rng([seed, 3]).permutation(n_prompts)", "tests/test_rollout_prompts.py -k prompt_rows"),
)

# Mutations that keep behaviour identical, with why (none may be counted as survivors).
EQUIVALENT: dict[str, str] = {}


def _pytest(cwd: str, args: str, timeout: int, env: dict) -> tuple[str, float, str]:
  """(outcome, seconds, first failing test or error line) of one pytest run."""
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
         *shlex.split(args)]
  try:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - t0, ""
  seconds = time.perf_counter() - t0
  out = proc.stdout + proc.stderr
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
  if proc.returncode == 0:
    return "passed", seconds, ""
  if proc.returncode == 5:
    return "no tests", seconds, args
  return "failed", seconds, failed[0] if failed else out.strip().splitlines()[-1][:200]


def _copy_repo(dest: str) -> None:
  for name in COPIED:
    src = os.path.join(REPO, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dest, name), symlinks=True,
                      ignore=shutil.ignore_patterns("__pycache__", "results"))
    else:
      shutil.copy(src, dest)
  for pkg, folder in (("constitutions", "constitutions"), ("configs", "configs")):
    link = os.path.join(dest, "cai_jax", pkg)  # the wheel's mapping, as in a checkout
    if not os.path.exists(link):
      os.symlink(os.path.join("..", folder), link)


def run_all(mutations, timeout: int, out_path: str) -> dict:
  names = [m.name for m in mutations]
  if len(set(names)) != len(names):
    raise ValueError("mutation names must be unique")
  work = tempfile.mkdtemp(prefix="cai_jax_mutations_")
  cache = os.path.join(work, "jit_cache")
  os.makedirs(cache)
  env = {**os.environ, "CAI_JAX_TEST_JIT_CACHE": cache, "JAX_COMPILATION_CACHE_DIR": cache}
  copy = os.path.join(work, "repo")
  os.makedirs(copy)
  _copy_repo(copy)
  try:
    for m in mutations:  # every mutation applies, before anything runs
      with open(os.path.join(copy, m.file)) as f:
        m.apply(f.read())
    for tests in sorted({m.tests for m in mutations}):  # each selection passes unchanged
      outcome, seconds, detail = _pytest(copy, tests, timeout, env)
      print(f"baseline {outcome:>6} {seconds:6.1f} s  {tests}", flush=True)
      if outcome != "passed":
        raise SystemExit(f"{tests}: fails without any mutation ({detail}); fix it first")
    rows = []
    for m in mutations:
      path = os.path.join(copy, m.file)
      with open(path) as f:
        original = f.read()
      with open(path, "w") as f:
        f.write(m.apply(original))
      try:
        outcome, seconds, detail = _pytest(copy, m.tests, timeout, env)
      finally:
        with open(path, "w") as f:
          f.write(original)
      status = {"passed": "survived", "failed": "killed", "timeout": "killed (timeout)",
                "no tests": "no tests selected"}[outcome]
      rows.append({"name": m.name, "file": m.file, "old": m.old, "new": m.new,
                   "tests": m.tests, "status": status, "seconds": round(seconds, 1),
                   "caught_by": detail})
      print(f"{status:>17}  {seconds:6.1f} s  {m.name}  {detail}", flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  killed = sum(r["status"].startswith("killed") for r in rows)
  equivalent = [r["name"] for r in rows if r["status"] == "survived" and r["name"] in EQUIVALENT]
  survived = [r["name"] for r in rows if r["status"] == "survived" and r["name"] not in EQUIVALENT]
  scored = len(rows) - len(equivalent)
  result = {
      "command": "python -m benchmarks.robustness.mutations " + " ".join(sys.argv[1:]),
      "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
      "mutations": len(rows), "killed": killed, "equivalent": equivalent,
      "survived_unexplained": survived, "score": killed / max(scored, 1),
      "seconds": round(sum(r["seconds"] for r in rows), 1),
      "rows": rows, "why_equivalent": {k: v for k, v in EQUIVALENT.items() if k in equivalent}}
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{killed} of {len(rows)} killed ({len(equivalent)} equivalent, {len(survived)}"
        f" unexplained survivors): score {result['score']:.3f}; {result['seconds']:.0f} s;"
        f" {out_path}")
  return result


def main(argv):
  del argv
  chosen = MUTATIONS
  if FLAGS.only:
    wanted = set(FLAGS.only.split(","))
    chosen = tuple(m for m in MUTATIONS if m.name in wanted)
    if wanted - {m.name for m in chosen}:
      raise SystemExit(f"--only: unknown mutations {sorted(wanted - {m.name for m in chosen})}")
  run_all(chosen, FLAGS.timeout, FLAGS.out)


if __name__ == "__main__":
  FLAGS = flags.FLAGS
  flags.DEFINE_string("only", "", "Comma-separated mutation names (default: all).")
  flags.DEFINE_integer("timeout", 300, "Seconds a mutation's tests may take.")
  flags.DEFINE_string("out", os.path.join(REPO, "benchmarks", "results", "cpu",
                                          "mutations.json"), "Result file.")
  app.run(main)
