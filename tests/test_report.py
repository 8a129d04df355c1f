"""The run's Markdown report (evaluation/report.py) of a workdir with no stage output."""

import re

from cai_jax.evaluation import report


def section(text: str, title: str) -> str:
  """The body of one `## title` section of the report."""
  m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
  assert m, f"section {title!r} missing"
  return m.group(1)


def test_report_without_any_stage_output(tmp_path):
  path = report.write_report(str(tmp_path))
  text = open(path).read()
  for title in report.SECTIONS:
    body = section(text, title)
    assert "_Not available:" in body, title
  assert "p8_evaluation/results.json (stage 8 has not run)" in text
