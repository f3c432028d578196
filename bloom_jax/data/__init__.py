"""ROOTS data for BLOOM: language table, seqio tasks and mixture, vocabularies, token store,
packed stream.

Importing the package loads no TensorFlow: the store's writers and readers need none, nor do
generate, serve and the Hugging Face export, which open vocabulary files directly
(`vocabulary_files.py`). The modules that use seqio hide the accelerators from TensorFlow
(`vocabularies.py`).
"""
