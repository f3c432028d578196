"""bloom_jax: BLOOM in JAX/Flax, its sharded trainer and tools.

seqio and clu bring TensorFlow, which is kept quiet (set before anything imports it) and, in
bloom_jax.data, off the accelerators: JAX owns them.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
