"""Generation-based evaluation: batched predictions for a dev set, ROUGE-1/2/L and BLEU-4 as the THUDM scripts.

``metrics`` scores text pairs, ``predict`` generates and writes ``generated_predictions.jsonl``, ``hook`` gives the
training loop a ``model -> metrics`` callable, ``command`` is ``glmtune eval``.
"""
