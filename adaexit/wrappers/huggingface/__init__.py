"""Hugging Face encoder classifiers as adaptive models: exits after encoder layers, attention masks carried
by the surviving rows, padding trimmed as rows leave.

``wrap(model, exits=["bert.encoder.layer.1", "bert.encoder.layer.3"])`` on a
``BertForSequenceClassification``, ``RobertaForSequenceClassification``,
``DistilBertForSequenceClassification`` or ``ViTForImageClassification`` (transformers 5.x) gives a
:class:`TransformerExits`: the same keyword inputs, the same output type, and in ``eval()`` mode layer ``k``
runs only on the rows still alive at ``k``.

How rows travel (on the one executor):

* node 0 embeds the input (:class:`TokenBatch`: ids, 2-D attention mask, token types, position ids; or
  pixel values) and runs the first layers; after the embeddings only the hidden states and the 2-D
  attention mask travel with a row (:class:`SequenceBatch`: position ids and token types are consumed by the
  embeddings);
* every node rebuilds the 4-D attention mask of its rows from the 2-D one (a broadcast view: the same
  logits as the model's own materialised mask, for the sdpa and eager attention implementations);
* after each decision the survivors are cut to the longest real length among them (right padding):
  the same results for their real tokens, fewer tokens for every later layer. The lengths are read with
  the decision's one host synchronisation.

A row's exit and logits do not depend on the batch it came in or on its padding (to float rounding).
Left padding is refused: the models' heads read position 0, which is then a pad token.
"""

from .families import FAMILIES, ClassifierHead, Family, HiddenStatesHead, MeanPoolHead, is_huggingface
from .model import EncoderSegment, TransformerExits, wrap_transformer
from .rows import SequenceBatch, TokenBatch

__all__ = ["FAMILIES", "ClassifierHead", "EncoderSegment", "Family", "HiddenStatesHead", "MeanPoolHead",
           "SequenceBatch", "TokenBatch", "TransformerExits", "is_huggingface", "wrap_transformer"]
