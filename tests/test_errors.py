"""Data errors and the skip report (`errors.py`): messages, pickling, counting."""

import pickle

from vldeformer_jax.data.errors import DataError, SkipReport


def test_data_error_message_and_pickling():
  error = DataError("/d/features.tsv", "bad base64", kind="bad_base64", line=3,
                    key="42")
  assert str(error) == "/d/features.tsv, line 3 (image id 42): bad base64 [bad_base64]"
  assert isinstance(error, ValueError)
  clone = pickle.loads(pickle.dumps(error))
  assert str(clone) == str(error) and clone.line == 3 and clone.kind == "bad_base64"


def test_skip_report_caps_messages_but_counts_all():
  report = SkipReport(max_messages=2)
  for i in range(5):
    report.record(DataError("f.tsv", "bad", kind="bad_row", line=i + 1))
  report.record(DataError("f.tsv", "bad", kind="bad_row", line=1))  # Same problem.
  assert report.total == 5 and len(report.messages) == 2
  assert "and 3 more" in report.summary()
