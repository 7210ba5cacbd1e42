"""The inspector's review page: verdicts on scored parts, kept in an append-only log.

- :mod:`dualstpm.review.log`: the review log (``PREDICTIONS_DIR/review/verdicts.jsonl``),
  its schema, appends under an OS lock, masks.
- :mod:`dualstpm.review.parts`: the parts of a ``predictions.csv`` and the review order.
- :mod:`dualstpm.review.app`: the web page (FastAPI, Jinja template, vanilla JS) and its server.

`log` and `parts` import neither the web stack nor torch (storing an uploaded mask uses
`dualstpm.data.images`, numpy and PIL only), so the feedback and monitoring code can read
the log cheaply.
"""
