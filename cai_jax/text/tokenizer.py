"""One tokenizer interface over Hugging Face and SentencePiece tokenizers.

Backends:
  "hf"  a `transformers` fast tokenizer: from a directory (tokenizer.json), from
        the tokenizer embedded in a GGUF file, or wrapping a `tokenizers`
        object built in memory.
  "sp"  a SentencePiece `.model` file.

Chat prompts are rendered with the chat template (Jinja, transformers'
sandboxed renderer); the template may be overridden per tokenizer or per call,
which is the only way to chat with a base model or a SentencePiece model.
Remote code is never run (`trust_remote_code=False`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any, Literal

_PROBE_USER = "cai-jax-probe-question"
_PROBE_ANSWER = "cai-jax-probe-answer"


class TokenizerError(ValueError):
  """A tokenizer that cannot be loaded or used as asked; the message says the fix."""


class Tokenizer:
  """Text <-> token ids, chat templates and special ids, for one model.

  `eos_ids` holds every id that ends generation: the tokenizer's EOS plus the
  end-of-turn token the chat template emits after an assistant message (e.g.
  `<|im_end|>`), so sampling stops at the end of a chat turn.
  """

  def __init__(self, backend: Any, kind: Literal["hf", "sp"], *,
               chat_template: str | None = None,
               default_system_prompt: str | None = None,
               source: str = "tokenizer"):
    self._tok = backend
    self.kind = kind
    self.source = source
    self.default_system_prompt = default_system_prompt
    if kind == "hf":
      if chat_template is not None:
        backend.chat_template = chat_template
      self._chat_template = getattr(backend, "chat_template", None) or None
      self._special = set(backend.all_special_ids)
      self._special.update(i for i, t in backend.added_tokens_decoder.items()
                           if getattr(t, "special", False))
      self._default_add_bos = self._detect_default_add_bos()
    else:
      self._chat_template = chat_template
      self._special = _sp_special_ids(backend)
      self._default_add_bos = backend.bos_id() >= 0
    self.eos_ids = self._find_eos_ids()

  # --- Construction -----------------------------------------------------------

  @classmethod
  def from_dir(cls, path: str, **kw) -> "Tokenizer":
    """From a directory with tokenizer.json (transformers) or tokenizer.model (SentencePiece)."""
    if not os.path.isdir(path):
      raise TokenizerError(f"{path}: not a directory")
    if (os.path.exists(os.path.join(path, "tokenizer.json"))
        or os.path.exists(os.path.join(path, "tokenizer_config.json"))
        and not os.path.exists(os.path.join(path, "tokenizer.model"))):
      from transformers import AutoTokenizer
      try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
      except Exception as e:  # transformers raises many kinds
        raise TokenizerError(f"{path}: transformers cannot load the tokenizer ({e})") from e
      return cls(tok, "hf", source=path, **kw)
    sp_file = os.path.join(path, "tokenizer.model")
    if os.path.exists(sp_file):
      template = kw.pop("chat_template", None) or _read_template(path)
      return cls.from_sentencepiece(sp_file, chat_template=template, **kw)
    raise TokenizerError(
        f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model; pass a"
        " model directory saved with save_pretrained() or Tokenizer.save()")

  @classmethod
  def from_gguf(cls, path: str, **kw) -> "Tokenizer":
    """The tokenizer embedded in a GGUF file (built by transformers; ~1-10 s)."""
    from transformers import AutoTokenizer
    path = os.path.abspath(path)
    try:
      tok = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                          gguf_file=os.path.basename(path),
                                          trust_remote_code=False)
    except Exception as e:
      raise TokenizerError(
          f"{path}: transformers cannot build the tokenizer from the GGUF metadata"
          f" ({e}); transformers needs PyTorch to read a GGUF (`pip install torch`, the CPU"
          f" wheel is enough, or `pip install 'cai_jax[gguf]'`) and `gguf`") from e
    return cls(tok, "hf", source=path, **kw)

  @classmethod
  def from_sentencepiece(cls, model_file: str, **kw) -> "Tokenizer":
    import sentencepiece as spm
    if not os.path.isfile(model_file):
      raise TokenizerError(f"{model_file}: no such SentencePiece model file")
    try:
      sp = spm.SentencePieceProcessor(model_file=model_file)
    except Exception as e:
      raise TokenizerError(f"{model_file}: not a SentencePiece model ({e})") from e
    tok = cls(sp, "sp", source=model_file, **kw)
    tok._sp_file = model_file
    return tok

  @classmethod
  def from_tokenizers(cls, tok: Any, *, bos_token: str | None = None,
                      eos_token: str | None = None, pad_token: str | None = None,
                      unk_token: str | None = None, **kw) -> "Tokenizer":
    """Wrap an in-memory `tokenizers.Tokenizer` (e.g. one trained in a test)."""
    from transformers import PreTrainedTokenizerFast
    specials = {k: v for k, v in dict(bos_token=bos_token, eos_token=eos_token,
                                      pad_token=pad_token, unk_token=unk_token).items()
                if v is not None}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    return cls(hf, "hf", source="tokenizers object", **kw)

  @classmethod
  def load(cls, spec: str, **kw) -> "Tokenizer":
    """From a directory, a .gguf file or a SentencePiece .model file."""
    if os.path.isdir(spec):
      return cls.from_dir(spec, **kw)
    if spec.endswith(".gguf"):
      return cls.from_gguf(spec, **kw)
    if spec.endswith(".model"):
      return cls.from_sentencepiece(spec, **kw)
    raise TokenizerError(f"{spec}: expected a directory, a .gguf or a .model file")

  def with_system_prompt(self, system_prompt: str | None) -> "Tokenizer":
    """A copy whose chats get `system_prompt` unless one is given."""
    out = copy.copy(self)
    out.default_system_prompt = system_prompt
    return out

  # --- Special ids ----------------------------------------------------------------

  @property
  def bos_id(self) -> int | None:
    if self.kind == "hf":
      return self._tok.bos_token_id
    i = self._tok.bos_id()
    return i if i >= 0 else None

  @property
  def pad_id(self) -> int:
    """The pad id; tokenizers without one pad with their first EOS."""
    pad = self._tok.pad_token_id if self.kind == "hf" else self._tok.pad_id()
    if pad is not None and pad >= 0:
      return pad
    return self.eos_ids[0] if self.eos_ids else 0

  @property
  def vocab_size(self) -> int:
    """Ids the tokenizer can emit (the model's embedding may have more rows)."""
    return len(self._tok) if self.kind == "hf" else self._tok.get_piece_size()

  @property
  def chat_template(self) -> str | None:
    return self._chat_template

  def token_id(self, piece: str) -> int:
    """The id of one vocabulary piece, e.g. "<|im_end|>"; KeyError if absent."""
    if self.kind == "hf":
      i = self._tok.convert_tokens_to_ids(piece)
      if i is None or (i == self._tok.unk_token_id and piece != self._tok.unk_token):
        raise KeyError(f"{piece!r} is not a single token of {self.source}")
      return i
    i = self._tok.piece_to_id(piece)
    if i == self._tok.unk_id() and piece != self._tok.id_to_piece(i):
      raise KeyError(f"{piece!r} is not a single token of {self.source}")
    return i

  def is_special(self, token_id: int) -> bool:
    return token_id in self._special

  # --- Encoding -----------------------------------------------------------------------

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; never appends EOS.

    add_bos=None follows the tokenizer's own convention (Gemma and Llama add
    BOS, SmolLM2 and Qwen do not). A BOS already at the start of `text` (as
    chat templates emit it) is not doubled.
    """
    return self._with_bos(self._encode_plain([text])[0], add_bos)

  def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None
                   ) -> list[list[int]]:
    return [self._with_bos(ids, add_bos) for ids in self._encode_plain(list(texts))]

  def _encode_plain(self, texts: list[str]) -> list[list[int]]:
    if self.kind == "hf":
      if not texts:
        return []
      return [list(x) for x in self._tok(texts, add_special_tokens=False)["input_ids"]]
    return [list(x) for x in self._tok.encode(texts)]

  def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
    add = self._default_add_bos if add_bos is None else add_bos
    bos = self.bos_id
    if add and bos is not None and not (ids and ids[0] == bos):
      return [bos] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if self.kind == "hf":
      return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special]
    return self._tok.decode(ids)

  # --- Chat ---------------------------------------------------------------------------

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                          system_prompt: str | None = None,
                          chat_template: str | None = None) -> str:
    """The prompt string for `messages` (role/content dicts).

    The system prompt is, in order: a system message already in `messages`,
    `system_prompt`, this tokenizer's `default_system_prompt`, and finally
    whatever default the template itself has.
    """
    template = chat_template or self._chat_template
    if not template:
      raise TokenizerError(
          f"{self.source}: this tokenizer has no chat template (a base model or a"
          " SentencePiece model); pass chat_template='...jinja...' or build plain-text"
          " prompts instead")
    messages = [dict(m) for m in messages]
    system = system_prompt if system_prompt is not None else self.default_system_prompt
    if system is not None and not (messages and messages[0].get("role") == "system"):
      messages = [{"role": "system", "content": system}] + messages
    try:
      if self.kind == "hf":
        return self._tok.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             chat_template=template)
      from transformers.utils.chat_template_utils import render_jinja_template
      specials = {"bos_token": self._piece(self.bos_id),
                  "eos_token": self._piece(self._tok.eos_id())}
      rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                          add_generation_prompt=add_generation_prompt,
                                          **specials)
      return rendered[0]
    except TokenizerError:
      raise
    except Exception as e:  # jinja errors, raise_exception() in templates
      raise TokenizerError(f"{self.source}: chat template failed on these messages ({e})") from e

  def _piece(self, i: int | None) -> str:
    if i is None or i < 0:
      return ""
    return self._tok.id_to_piece(i)

  # --- Saving ---------------------------------------------------------------------------

  def save(self, path: str) -> None:
    """Write tokenizer files (and the chat template) to `path`.

    "hf": transformers' save_pretrained, so `AutoTokenizer.from_pretrained(path)`
    loads it. "sp": tokenizer.model + chat_template.jinja + a
    tokenizer_config.json; `Tokenizer.from_dir(path)` reloads it exactly, and
    transformers reads it as a LlamaTokenizer, which agrees on plain text but
    may place the word-boundary prefix differently around user-defined pieces.
    """
    os.makedirs(path, exist_ok=True)
    if self.kind == "hf":
      self._tok.save_pretrained(path)
      return
    shutil.copyfile(self._sp_file, os.path.join(path, "tokenizer.model"))
    config = {"bos_token": self._piece(self.bos_id) or None,
              "eos_token": self._piece(self._tok.eos_id()) or None,
              "unk_token": self._piece(self._tok.unk_id()) or None,
              "pad_token": self._piece(self._tok.pad_id()) or None,
              "add_bos_token": self._default_add_bos,
              "add_eos_token": False,
              "tokenizer_class": "LlamaTokenizer"}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    if self._chat_template:
      with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(self._chat_template)

  # --- Internals --------------------------------------------------------------------------

  def _detect_default_add_bos(self) -> bool:
    bos = self._tok.bos_token_id
    if bos is None:
      return False
    ids = self._tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos

  def _find_eos_ids(self) -> tuple[int, ...]:
    eos = self._tok.eos_token_id if self.kind == "hf" else self._tok.eos_id()
    out = [eos] if eos is not None and eos >= 0 else []
    end = self._end_of_turn_id()
    if end is not None and end not in out:
      out.append(end)
    return tuple(out)

  def _end_of_turn_id(self) -> int | None:
    """The special token a chat template emits right after an assistant message."""
    if not self._chat_template:
      return None
    try:
      text = self.apply_chat_template(
          [{"role": "user", "content": _PROBE_USER},
           {"role": "assistant", "content": _PROBE_ANSWER}],
          add_generation_prompt=False, system_prompt=None)
    except TokenizerError:
      return None
    if _PROBE_ANSWER not in text:
      return None
    suffix = text.rsplit(_PROBE_ANSWER, 1)[1]
    ids = self._encode_plain([suffix])[0] if suffix else []
    for i in ids[:2]:
      if self.is_special(i):
        return i
    return None

  def __repr__(self) -> str:
    return (f"Tokenizer({self.kind}, source={self.source!r}, vocab={self.vocab_size},"
            f" bos={self.bos_id}, eos={self.eos_ids}, pad={self.pad_id})")


def _sp_special_ids(sp) -> set[int]:
  """Control and user-defined pieces (e.g. <|im_end|>): the SentencePiece specials."""
  special = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}
  try:
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    user = pb.ModelProto.SentencePiece.USER_DEFINED
    special.update(i for i, p in enumerate(proto.pieces) if p.type == user)
  except Exception:  # protobuf missing or incompatible: control pieces only
    pass
  return special


def _read_template(path: str) -> str | None:
  jinja = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja) as f:
      return f.read()
  cfg = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(cfg):
    with open(cfg) as f:
      return json.load(f).get("chat_template")
  return None
