"""Tokenizer: tiny tokenizers trained in-process (byte-level BPE, SentencePiece)."""

import io

import pytest

from cai_jax.text.tokenizer import Tokenizer, TokenizerError

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nDefault system.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Constitutional AI trains a harmless, helpful assistant.",
    "Critique the response, then revise it to remove anything harmful.",
    "Hello world! How are you today? I am fine, thank you.",
] * 10
TEXTS = ["Hello world!", "Critique: the fox is quick.", "ünïcödé and emoji 🙂 work too",
         "  leading spaces\nand a newline"]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe():
  """A byte-level BPE (GPT-2 / SmolLM2 / Qwen style) with a ChatML template."""
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  raw.train_from_iterator(CORPUS, trainer)
  return Tokenizer.from_tokenizers(raw, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   chat_template=CHATML)


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=360,
      model_type="bpe", character_coverage=1.0, byte_fallback=True, unk_id=0,
      bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
      minloglevel=2)
  path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
  path.write_bytes(model.getvalue())
  return str(path)


def test_bpe_round_trip(bpe):
  for text in TEXTS:
    ids = bpe.encode(text)
    assert ids and all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_special_ids(bpe):
  assert bpe.bos_id == bpe.token_id("<s>")
  assert bpe.pad_id == bpe.token_id("<pad>")
  # EOS plus the template's end-of-turn token, so generation stops after a turn.
  assert bpe.eos_ids == (bpe.token_id("</s>"), bpe.token_id("<|im_end|>"))
  assert bpe.is_special(bpe.token_id("<|im_end|>"))
  with pytest.raises(KeyError):
    bpe.token_id("not-a-single-token")


def test_bpe_bos_handling(bpe):
  plain = bpe.encode("Hello world!")
  assert plain[0] != bpe.bos_id  # this tokenizer adds no BOS by default
  with_bos = bpe.encode("Hello world!", add_bos=True)
  assert with_bos == [bpe.bos_id] + plain
  # A BOS already in the text (chat templates emit it) is not doubled.
  assert bpe.encode("<s>Hello world!", add_bos=True) == with_bos
  assert bpe.decode(with_bos) == "Hello world!"
  assert bpe.decode(with_bos, skip_special_tokens=False) == "<s>Hello world!"


def test_bpe_batch_matches_single(bpe):
  assert bpe.encode_batch(TEXTS) == [bpe.encode(t) for t in TEXTS]
  assert bpe.encode_batch(TEXTS, add_bos=True) == [bpe.encode(t, add_bos=True) for t in TEXTS]
  assert bpe.encode_batch([]) == []


def test_chat_template(bpe):
  msgs = [{"role": "user", "content": "Is it safe?"}]
  prompt = bpe.apply_chat_template(msgs)
  assert prompt == ("<|im_start|>system\nDefault system.<|im_end|>\n"
                    "<|im_start|>user\nIs it safe?<|im_end|>\n<|im_start|>assistant\n")
  ids = bpe.encode(prompt)
  assert ids[0] == bpe.token_id("<|im_start|>")  # special tokens stay single ids
  assert ids.count(bpe.token_id("<|im_end|>")) == 2

  custom = bpe.apply_chat_template(msgs, system_prompt="Be brief.")
  assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>")
  # A system message in the conversation wins over system_prompt.
  own = bpe.apply_chat_template([{"role": "system", "content": "Mine."}] + msgs,
                                system_prompt="Ignored.")
  assert own.startswith("<|im_start|>system\nMine.<|im_end|>") and "Ignored" not in own
  assert not bpe.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")

  helpful = bpe.with_system_prompt("You are a helpful assistant.")
  assert "You are a helpful assistant." in helpful.apply_chat_template(msgs)
  assert "Default system." in bpe.apply_chat_template(msgs)  # the original is unchanged

  other = bpe.apply_chat_template(msgs, chat_template="{{ messages[0]['content'] }}!")
  assert other == "Is it safe?!"


def test_no_template_is_a_clear_error():
  from tokenizers import Tokenizer as RawTokenizer, models
  raw = RawTokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
  tok = Tokenizer.from_tokenizers(raw, unk_token="<unk>")
  with pytest.raises(TokenizerError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bpe_save_reload(bpe, tmp_path):
  bpe.save(str(tmp_path))
  again = Tokenizer.from_dir(str(tmp_path))
  for text in TEXTS:
    assert again.encode(text) == bpe.encode(text)
  msgs = [{"role": "user", "content": "hi"}]
  assert again.apply_chat_template(msgs) == bpe.apply_chat_template(msgs)
  assert (again.bos_id, again.eos_ids, again.pad_id) == (bpe.bos_id, bpe.eos_ids, bpe.pad_id)
  # transformers itself reads the directory, template included.
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf(TEXTS[1], add_special_tokens=False)["input_ids"] == bpe.encode(TEXTS[1])
  assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
      bpe.apply_chat_template(msgs)


def test_sentencepiece(sp_file, tmp_path):
  tok = Tokenizer.load(sp_file, chat_template=CHATML)
  assert (tok.bos_id, tok.pad_id) == (1, 3)
  assert tok.eos_ids == (2, tok.token_id("<|im_end|>"))
  for text in TEXTS[:3]:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id  # SentencePiece models add BOS by default
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]
  assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hello world!"}],
                                   system_prompt="Be kind.")
  assert prompt.startswith("<|im_start|>system\nBe kind.<|im_end|>")
  assert tok.token_id("<|im_end|>") in tok.encode(prompt)

  tok.save(str(tmp_path))
  again = Tokenizer.from_dir(str(tmp_path))
  assert again.kind == "sp" and again.chat_template == CHATML
  assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf(TEXTS[0])["input_ids"] == tok.encode(TEXTS[0])


def test_sentencepiece_without_template(sp_file):
  tok = Tokenizer.from_sentencepiece(sp_file)
  assert tok.eos_ids == (2,)
  with pytest.raises(TokenizerError, match="chat_template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_errors(tmp_path):
  with pytest.raises(TokenizerError, match="no tokenizer.json"):
    Tokenizer.from_dir(str(tmp_path))
  with pytest.raises(TokenizerError):
    Tokenizer.load(str(tmp_path / "missing.txt"))
