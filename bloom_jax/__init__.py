"""bloom_jax: BLOOM in JAX/Flax, its sharded trainer and tools.

seqio and clu bring TensorFlow, which is kept quiet (set before anything imports it) and, in
bloom_jax.data, off the accelerators: JAX owns them. A command (`python -m bloom_jax.<tool>`)
restarts itself at once with glibc's malloc on transparent huge pages (huge_pages.py).
"""

import os
import sys

from bloom_jax import huge_pages

if sys.argv[:1] == ["-m"]:  # Python is still locating the command's module: nothing ran yet.
    huge_pages.restart_with_huge_pages()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
