"""Stage records (cai_jax/records.py): a directory resumes only under the config it was
written with."""

import pytest

from cai_jax import records

from cai_jax.configs import ai_labels as labels_config


def test_labels_made_before_helpful_labels_resume_only_as_they_were_made(tmp_path):
  # A stage-5 directory written before `helpful_labels` existed labelled helpful
  # pairs under the constitution: today's default (helpfulness) is refused, naming
  # the old behaviour; helpful_labels="constitution" resumes it.
  import json as json_lib
  import ml_collections
  c = labels_config.get_config("tiny")
  old = {k: v for k, v in json_lib.loads(c.to_json()).items()
         if k not in ("helpful_labels", "helpful_question", "helpful_pointwise")}
  (tmp_path / "config.json").write_text(json_lib.dumps(old))
  records.write_shard(str(tmp_path), 0, [])
  with pytest.raises(ValueError, match=r"helpful_labels.*helpful_labels='constitution'"):
    records.check_same_config(str(tmp_path), c)
  c.helpful_labels = "constitution"
  records.check_same_config(str(tmp_path), ml_collections.ConfigDict(c.to_dict()))
