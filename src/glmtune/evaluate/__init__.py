"""Generation-based evaluation: batched predictions for a dev set, ROUGE-1/2/L and BLEU-4 as the THUDM scripts.

``metrics`` scores text pairs, ``predict`` generates and writes ``generated_predictions.jsonl``, ``hook`` gives the
training loop a ``model -> metrics`` callable, ``command`` is ``glmtune eval``.
"""

from glmtune.evaluate.hook import make_generation_eval_hook
from glmtune.evaluate.metrics import BLEU_KINDS, MetricsReport, bleu4, compute_metrics, rouge_f, score_pair
from glmtune.evaluate.predict import PREDICTIONS_FILE, Prediction, generate_predictions, predict_to_file

__all__ = [
    "BLEU_KINDS",
    "PREDICTIONS_FILE",
    "MetricsReport",
    "Prediction",
    "bleu4",
    "compute_metrics",
    "generate_predictions",
    "make_generation_eval_hook",
    "predict_to_file",
    "rouge_f",
    "score_pair",
]
