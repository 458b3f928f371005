"""Distillation: a BERT-tiny student that reproduces a pretrained teacher's sentence embeddings.

``corpus`` picks the texts (what the product embeds, held-out texts kept apart), ``student`` builds and
trains the student, ``step`` is the training job's ``distill`` step with its cache.
"""
