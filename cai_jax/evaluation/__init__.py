"""Evaluation instruments: win rates and Elo, the judges (the PM and an
independent judge model), answers of each model, and labeler accuracy."""
