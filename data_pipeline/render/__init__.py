"""Meshes -> Blender renders -> schema-v1 shards, on one machine or a Ray cluster.

    python -m data_pipeline.render MESH_OR_DIR_OR_URL... --out DIR_OR_URL [options]

Modules: ``settings`` (typed settings, camera sampling), ``blender`` (everything that touches
bpy), ``objects`` (one mesh -> one sample), ``inputs`` (finding meshes), ``parts`` (work split
into parts, manifest, resume), ``run`` (local worker processes or Ray tasks), ``cli``.
"""
