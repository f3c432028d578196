"""ROOTS data for BLOOM: language table, seqio tasks and mixture, vocabularies, packed stream.

seqio brings TensorFlow; it is kept off the accelerators (JAX owns them).
"""

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already set up its devices in this process; leave them be
    pass
