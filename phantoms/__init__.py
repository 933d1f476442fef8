"""Generated DICOM test data (no real patients): a CT series writer and seeded chest phantoms.

A neutral package: the demo, the result encoders' warm-up, ``bench/``, ``tests/`` and the
training scripts of ``models/`` use it, and it imports none of them (numpy, SciPy and
pydicom only), so ``models`` can use it without importing the node.
"""
