"""Sharding of bloom_jax over a named device mesh.

mesh.py: the (stage, data, fsdp, tensor) mesh; rules.py: the logical-to-mesh axis rules;
validation.py: divisibility checks with proposed meshes; shardings.py: NamedShardings for
parameters, optimizer state and batches, and sharded initialization.
"""
