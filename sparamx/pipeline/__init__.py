"""The pipeline: model -> pruned -> evaluated -> packed -> verified -> timed -> report.

``runner`` orders the stages and keeps the run directory's ``state.json``
(``runstate``); each stage is one module (``load``, ``calibrate``, ``prune``,
``evaluate``, ``pack``, ``verify``, ``bench``, ``report``); ``config`` is the YAML
schema and ``streaming`` the layer-by-layer prune + pack for models larger than RAM.
``python -m sparamx.pipeline CONFIG`` runs it (``sparamx run``).
"""
