"""The teacher service's wire API, generated from ``protos/vidalign/teacher``.

Regenerate with ``make protos``; ``tests/unit/test_protos.py`` fails when the
committed code and the .proto files disagree.
"""
