"""The workdir layout (cai_jax/paths.py): where the SL-CAI model is."""

import os

import pytest

from cai_jax import paths


def test_pairs_default_to_the_sft_export(tmp_path):
  with pytest.raises(FileNotFoundError, match="run stage 3 first"):
    paths.sl_cai_model("", str(tmp_path))
  os.makedirs(tmp_path / "p3_sft" / "hf")
  assert paths.sl_cai_model("", str(tmp_path)) == str(tmp_path / "p3_sft" / "hf")
  assert paths.sl_cai_model("smollm2-135m-instruct", str(tmp_path)) == "smollm2-135m-instruct"
