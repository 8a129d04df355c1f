"""Evaluation instruments: win rates and Elo, the judges (the PM and an
independent judge model), answers of each model, labeler accuracy, the run's
claims with their intervals (`evidence`, `diagnosis`) and the Markdown report
that renders them (`report`)."""
