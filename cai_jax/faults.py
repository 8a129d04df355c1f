"""Damage to a finished file, as disk rot or a torn copy would do it: what the chaos
run and the kill-and-resume tests inject to check that the seals (a checkpoint step's
`training.checkpoint.CHECKSUMS`, a record shard's `records.SEAL`) catch it."""

from __future__ import annotations

import os


def damage(target: str) -> str:
  """Flips 16 bytes in the middle of the record shard `target`, or, for a checkpoint step
  directory, of its largest params file; returns the path of the damaged file."""
  path = target
  if os.path.isdir(target):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(target, "params"))
             for f in fs]
    path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    f.seek(0)
    f.write(data)
  return path
