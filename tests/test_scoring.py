"""Option scoring (feedback/scoring.py): the scorer against a full forward, one compile per
bucket."""

import jax
import numpy as np
import pytest

from cai_jax.feedback import OptionScorer
from cai_jax.model import transformer

from test_labeler import feedback_model_dir, tiny_feedback


def test_scorer_matches_a_full_forward_and_compiles_once_per_bucket(tiny_feedback):
  m = tiny_feedback
  rng = np.random.default_rng(0)
  V = m.cfg.vocab_size
  contexts = [list(rng.integers(3, V, size=n)) for n in (5, 40, 17, 3, 60, 9)]
  ids = [tuple(rng.integers(0, V, size=2)) for _ in contexts]
  scorer = OptionScorer(m.cfg, pad_id=m.tok.pad_id, batch_size=4, sharder=m.sharder,
                        length_buckets=(16, 64))
  got = scorer(m.params, contexts, ids)
  for c, i, row in zip(contexts, ids, got):
    logits, _ = transformer.forward(m.params, np.asarray([c]), m.cfg)
    want = jax.nn.log_softmax(logits[0, -1])[np.asarray(i)]
    np.testing.assert_allclose(row, want, atol=2e-5)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    scorer(m.params, contexts[:1], [(0, V)])
  traces = scorer.num_traces()
  assert traces <= 2  # one per length bucket used
  scorer(m.params, contexts[::-1], ids[::-1])
  assert scorer.num_traces() == traces
