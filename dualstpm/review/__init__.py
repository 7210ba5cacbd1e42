"""The inspector's review page: verdicts on scored parts, kept in an append-only log.

- :mod:`dualstpm.review.log`: the review log (``PREDICTIONS_DIR/review/verdicts.jsonl``),
  its schema, appends under an OS lock, masks.
- :mod:`dualstpm.review.parts`: the parts of a ``predictions.csv`` and the review order.
- :mod:`dualstpm.review.app`: the web page (FastAPI, Jinja template, vanilla JS) and its server.

Only the standard library and pandas/PIL are imported by `log` and `parts`, so the feedback
and monitoring code can read the log without the web stack.
"""
