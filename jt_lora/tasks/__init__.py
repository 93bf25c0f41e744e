"""Per-task data, decoding and scoring: E2E NLG (``tasks.e2e``) and BoolQ (``tasks.boolq``)."""
