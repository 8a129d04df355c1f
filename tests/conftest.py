"""Shared fixtures. 8 forced host devices so sharding tests run on a CPU mesh."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cai_jax.checkpoints import hf  # noqa: E402
from cai_jax.model import config as model_config  # noqa: E402

TINY_PRESETS = {
    "llama": model_config.tiny_llama,
    "mistral": model_config.tiny_mistral,
    "qwen2": model_config.tiny_qwen2,
    "gemma3": model_config.tiny_gemma3,
}


def make_hf_model(cfg, seed: int = 0, weight_scale: float = 1.0):
  """A random transformers model of `cfg`'s architecture (the reference)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  fields = {k: v for k, v in hf.config_to_hf(cfg).items() if k != "architectures"}
  hf_cfg = transformers.AutoConfig.for_model(**fields)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))  # not the identity, so a mix-up shows
      p.mul_(weight_scale)
  return model


@pytest.fixture(scope="session", params=sorted(TINY_PRESETS))
def tiny_hf(request, tmp_path_factory):
  """(family, transformers model, our cfg, our params) for each tiny family."""
  cfg = TINY_PRESETS[request.param]()
  model = make_hf_model(cfg, weight_scale=4.0)
  path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
  model.save_pretrained(path)
  loaded_cfg, params = hf.load_hf(path)
  return request.param, model, loaded_cfg, params


def left_pad(prompts, pad_id=0):
  T = max(len(p) for p in prompts)
  ids = np.full((len(prompts), T), pad_id, np.int64)
  mask = np.zeros((len(prompts), T), bool)
  for i, p in enumerate(prompts):
    ids[i, T - len(p):] = p
    mask[i, T - len(p):] = True
  return ids, mask
