"""ROOTS data for BLOOM: language table, seqio tasks and mixture, vocabularies, packed stream.

seqio brings TensorFlow; it is kept quiet and off the accelerators (JAX owns them).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already set up its devices in this process; leave them be
  pass
