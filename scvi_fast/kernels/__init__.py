"""Fast back-ends of the fused ops: ``native`` (compiled CPU) and ``triton`` (GPU).

Nothing here is imported by ``import scvi_fast``; :mod:`scvi_fast.functional`
loads a back-end on first use.
"""
