"""Text to token ids: the tokenizer, the one chat rule, padding and buckets."""
