"""Data: prompt sources, SFT examples and PM comparisons as token batches,
batch order, mixing and held-out splits."""
